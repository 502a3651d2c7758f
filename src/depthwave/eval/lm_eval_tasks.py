"""lm-eval task YAMLs for the built-in model's arithmetic problems (written out by `lm_harness.write_tasks`).

Both read a local JSON-lines file (`question`, `answer` with a final `The answer is N.` line) through
`dataset_path: json` and `data_files`, the way to run any lm-eval task offline. The prompt is the built-in chat
format that `depthwave eval --tasks arithmetic` uses, so the two harnesses see the same tokens.
"""

from __future__ import annotations

from depthwave.data.tokenizer import ASSISTANT_ROLE, BEGIN_HEADER, BEGIN_TEXT, END_HEADER, END_TURN

PROMPT = (
    f"{BEGIN_TEXT}{BEGIN_HEADER}user{END_HEADER}\\n\\n{{{{question | trim}}}}{END_TURN}"
    f"{BEGIN_HEADER}{ASSISTANT_ROLE}{END_HEADER}\\n\\n"
)
GOLD = "(answer.split('The answer is ')[-1].rstrip('.') | int)"
CHOICES = "[" + ", ".join(f"'The answer is ' ~ {n} ~ '.'" for n in ("g", "(g + 1)", "(g - 1)", "(g + 10)")) + "]"

DATA = """dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA_FILE
test_split: test
metadata:
  version: 1.0
"""

GENERATION = f"""task: depthwave_arithmetic
{DATA}output_type: generate_until
doc_to_text: "{PROMPT}"
doc_to_target: "{{{{{GOLD}}}}}"
generation_kwargs:
  until: ["{END_TURN}"]
  max_gen_toks: 128
  do_sample: false
# The first `The answer is N.`, as depthwave's own scorer reads it (commas ignored).
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "The answer is (-?[0-9,]+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [","]
"""

# The same problems as a bare question, for `--apply_chat_template` (the native model renders the built-in chat
# format itself, giving the same tokens; `local-chat-completions` sends the question as a user message).
CHAT = """include: depthwave_arithmetic.yaml
task: depthwave_arithmetic_chat
doc_to_text: "{{question | trim}}"
"""

# The worked solution up to its final line is the context; the choices are that line with the right number and
# three near misses, rotated by the number so that the right one moves around.
MULTIPLE_CHOICE = f"""task: depthwave_arithmetic_mc
{DATA}output_type: multiple_choice
doc_to_text: "{PROMPT}{{{{answer.split('The answer is ')[0]}}}}"
target_delimiter: ""
doc_to_choice: "{{% set g = {GOLD} %}}{{% set k = g % 4 %}}{{% set c = {CHOICES} %}}{{{{ c[k:] + c[:k] }}}}"
doc_to_target: "{{{{ (4 - {GOLD} % 4) % 4 }}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASKS = {
    "depthwave_arithmetic": GENERATION,
    "depthwave_arithmetic_chat": CHAT,
    "depthwave_arithmetic_mc": MULTIPLE_CHOICE,
}
