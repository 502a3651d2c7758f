"""Data for the built-in model: arithmetic word problems and the tokenizer trained on them."""
