"""Word pools of the arithmetic word problems: who, what, where and when, listed here (never downloaded).

The pools are wide on purpose. A model trained on twelve names and ten items learns those words instead of
the arithmetic, and fails on the first question a user writes with their own. With hundreds of names (from
several languages) and items, no single word recurs often enough to be memorised, and the model has to copy
whatever the question names.

Each pool is split in two by a keyed hash of the word, one decision per word whatever pool lists it: about one
word in five is held out of training, and only the unseen evaluation set draws from that part. An activity is
held out when its verb or its unit is. The words of the original (classic) problems are always on the training
side, so the classic test set stays in distribution.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

T = TypeVar("T")

_FEMALE = """
Ana Mia Zoe Emma Lily Sara Olivia Ava Sophia Isabella Charlotte Amelia Harper Evelyn Abigail Emily Ella Grace
Chloe Victoria Riley Aria Nora Hazel Ellie Stella Lucy Violet Aurora Hannah Leah Maya Ruby Alice Clara Eva Julia
Ivy Rose Jane Molly Daisy Holly Paige Megan Laura Rachel Rebecca Helen Diana Fiona Irene Kate Nina Tina Wendy
Lucia Carmen Elena Sofia Valeria Camila Paula Marta Pilar Rosa Ines Alba Noelia Lorena Ximena Guadalupe Beatriz
Mariana Catalina Renata Gabriela Juliette Camille Chloé Manon Léa Élodie Margaux Océane Amélie Colette Brigitte
Hélène Anke Greta Heidi Ilse Jutta Katrin Lena Frieda Marlene Ursula Sabine Giulia Chiara Francesca Alessia
Martina Serena Federica Ilaria Bianca Noemi Aiko Yuki Hana Sakura Emi Naomi Mei Keiko Akane Rin Priya Ananya
Diya Kavya Meera Pooja Lakshmi Sunita Anjali Nisha Fatima Aisha Layla Amira Yasmin Noor Zainab Salma Leila Huda
Olga Natasha Irina Tatiana Svetlana Anya Daria Ksenia Yulia Polina Agnieszka Zofia Kasia Magda Ewa Halina Ingrid
Astrid Freja Sigrid Elin Maja Linnea Saga Ebba Solveig Amara Chioma Ngozi Adaeze Zuri Imani Wanjiru Nia Ayana
Thandiwe Lan Linh Hoa Mai Thu Jiwoo Minji Seoyeon Yuna Eunji Xiu Ling Fang Jing Yan Ayşe Elif Zeynep Defne Ebru
Sinead Aoife Niamh Siobhan Maeve Keala Leilani Malia Tala Kiri Rocío
Ayşegül
"""
_MALE = """
Ben Tom Omar Noah Jack Liam Leo Max Sam Oscar Henry Oliver James Lucas Ethan Mason Logan Owen Caleb Ryan Nathan
Adam Aaron Carter Dylan Evan Gavin Isaac Jason Kevin Luke Mark Nick Paul Peter Simon Victor Walter Hugo Felix
Arthur Edward George Harry Frank Dennis Gordon Martin Philip Roger Carlos Diego Javier Mateo Pablo Rafael Sergio
Tomás Andrés Joaquín Emilio Alonso Ignacio Rodrigo Santiago Esteban Julien Mathis Étienne Théo Louis Baptiste
Rémi Lucien Gaspard Antoine Jérôme Klaus Jürgen Lukas Jonas Felipe Matthias Stefan Tobias Moritz Florian Dieter
Marco Luca Matteo Lorenzo Giovanni Davide Paolo Stefano Alessandro Riccardo Kenji Hiroshi Takeshi Haruto Ren
Sota Daiki Yuto Kaito Riku Arjun Rohan Vikram Aditya Rahul Sanjay Ravi Karan Martín
Anil Dev Yusuf Karim Hassan Tariq
Khalid Samir Bilal Rami Ziad Idris Ivan Dmitri Sergei Mikhail Alexei Nikolai Pavel Boris Yuri Oleg Piotr Tomasz
Krzysztof Jakub Marek Paweł Wojciech Łukasz Bartek Janusz Erik Lars Nils Anders Sven Bjorn Henrik Magnus Leif
Axel Chidi Emeka Obinna Kwame Kofi Jabari Baraka Tendai Sipho Themba Minh Duc Huy Quang Tuan Minjun Jihoon
Seojun Hyun Taeyang Jian Hao Ming Chen Bo Emre Mehmet Kerem Burak Cian Oisin Padraig Seamus Darragh
Kai Keanu Manu Tane Koa
"""

# (plural noun) things that are counted, packed, shared and sold
_THINGS = """
apples marbles stickers cards pencils cookies shells stamps beads eggs muffins oranges pears plums lemons peaches
cherries grapes bananas carrots potatoes onions tomatoes peppers melons walnuts almonds peanuts candies cupcakes
donuts pretzels bagels crackers biscuits pies tarts rolls buns waffles pancakes crayons markers erasers
rulers notebooks folders envelopes postcards letters buttons ribbons balloons candles flowers roses tulips
daisies lilies seeds acorns pebbles stones rocks coins tokens tickets badges pins keys bells whistles kites
puzzles blocks bricks tiles dice chess_pieces spoons forks bowls mugs napkins towels socks gloves mittens scarves
ties belts shoes boots slippers sandals caps helmets masks brushes combs clips magnets batteries bulbs nails
screws bolts washers hooks ropes chains wheels gears springs tubes straws cups glasses jars lids corks
leaves feathers sticks logs planks bottles cans boxes toys dolls robots trucks cars trains boats planes
ducks chicks kittens puppies fish frogs snails beetles butterflies bees ants worms figs dates kiwis limes
mangoes papayas coconuts apricots berries olives radishes beans peas nuts raisins rice_cakes sandwiches
dumplings noodles tacos burritos pizzas sausages pickles jellies candy_bars lollipops gumdrops mints toffees
brownies scones croissants macarons sketches photos paintings drawings poems stories songs books comics
magazines maps charts posters pennants banners shirts
"""

# (plural noun) goods bought at a price each
_SHOP_ITEMS = """
pens books cups hats toys plates shirts lamps chairs tables pillows blankets rugs mirrors clocks frames vases
baskets bowls mugs kettles pans pots knives spoons forks towels sheets curtains candles lanterns flashlights
radios speakers headphones cables chargers keyboards mice monitors tablets cameras lenses tripods backpacks
wallets purses belts scarves gloves jackets sweaters skirts dresses jeans shorts socks boots sneakers sandals
umbrellas raincoats helmets skates skateboards balls bats rackets nets rods tents sleeping_bags stools shelves
drawers boxes crates buckets hoses rakes shovels ladders hammers wrenches drills saws rolls cans
brushes notebooks calendars puzzles games dolls kites drums trumpets violins guitars tickets posters maps globes
plants pots seeds packets bulbs watches rings necklaces bracelets earrings brooches sunglasses wallets tickets
"""

# (singular noun) a single purchase made with savings
_PURCHASES = """
game bike coat radio watch phone camera guitar violin tablet laptop printer scooter skateboard helmet jacket
sweater backpack tent kayak drone telescope microscope keyboard speaker lamp chair desk bed sofa rug mirror
clock kettle toaster blender heater fan vacuum bicycle ticket puzzle doll robot train_set kite ball racket bat
saddle saw drill ladder wagon cart sled umbrella suitcase ring necklace bracelet painting poster book atlas
dictionary calculator fishing_rod sewing_machine piano_bench tricycle hammock
"""

_CONTAINERS = """
bags boxes jars packs crates baskets buckets trays cartons tins sacks bundles cases chests bins pouches
barrels kegs packets cups bowls pots pails drawers racks envelopes folders tubs coolers hampers satchels
"""

_SHOPS = """
shop store bakery market farm library cafe school kiosk stall deli grocery pharmacy florist bookshop toy_store
pet_shop garden_center hardware_store bike_shop candy_store shoe_store bazaar canteen cafeteria diner bistro
restaurant hotel museum gallery cinema theater zoo aquarium stadium factory warehouse workshop studio
boutique pantry food_bank charity_shop
"""

# (third person, plain form, unit)
_ACTIVITIES: tuple[tuple[str, str, str], ...] = (
    ("reads", "read", "pages"),
    ("runs", "run", "laps"),
    ("writes", "write", "lines"),
    ("folds", "fold", "cranes"),
    ("swims", "swim", "lengths"),
    ("paints", "paint", "pictures"),
    ("bakes", "bake", "cakes"),
    ("knits", "knit", "rows"),
    ("cycles", "cycle", "miles"),
    ("walks", "walk", "blocks"),
    ("sings", "sing", "songs"),
    ("plants", "plant", "trees"),
    ("solves", "solve", "puzzles"),
    ("types", "type", "words"),
    ("draws", "draw", "sketches"),
    ("picks", "pick", "berries"),
    ("builds", "build", "models"),
    ("sews", "sew", "patches"),
    ("collects", "collect", "shells"),
    ("catches", "catch", "fish"),
    ("washes", "wash", "dishes"),
    ("packs", "pack", "boxes"),
    ("prints", "print", "posters"),
    ("delivers", "deliver", "letters"),
    ("scores", "score", "points"),
    ("jumps", "jump", "ropes"),
    ("rows", "row", "kilometers"),
    ("hikes", "hike", "kilometers"),
    ("carves", "carve", "figures"),
    ("mends", "mend", "shirts"),
    ("answers", "answer", "emails"),
    ("records", "record", "videos"),
    ("sorts", "sort", "parcels"),
    ("stacks", "stack", "chairs"),
    ("shoots", "shoot", "photos"),
    ("learns", "learn", "words"),
    ("practices", "practice", "scales"),
    ("translates", "translate", "pages"),
    ("cooks", "cook", "meals"),
    ("grows", "grow", "flowers"),
)

DAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _words(text: str) -> tuple[str, ...]:
    """The entries of a pool listed above: separated by whitespace, `_` standing for a space inside an entry;
    an entry listed twice is kept once."""
    return tuple(dict.fromkeys(word.replace("_", " ") for word in text.split()))


def held_out(word: str) -> bool:
    """Whether a word is on the held-out side: one decision per word, whatever pool lists it."""
    digest = hashlib.blake2b(f"depthwave-pools:{word}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 5 == 0


def partition(
    pool: Sequence[T], keep: Collection[str] = (), words: Callable[[T], Sequence[str]] | None = None
) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """(train part, held-out part) of a pool: an entry is held out when any of its `words` is held out and not
    in `keep` (the classic problems' words, which stay on the training side in every pool). `words`: an
    entry's words (default: the entry itself, a word)."""

    def words_of(entry: T) -> Sequence[str]:
        return words(entry) if words is not None else (str(entry),)

    held = tuple(e for e in pool if any(held_out(w) and w not in keep for w in words_of(e)))
    return tuple(e for e in pool if e not in held), held


PEOPLE: tuple[tuple[str, str], ...] = tuple(
    dict.fromkeys([*((n, "she") for n in _words(_FEMALE)), *((n, "he") for n in _words(_MALE))])
)
THINGS = _words(_THINGS)
SHOP_ITEMS = _words(_SHOP_ITEMS)
PURCHASES = _words(_PURCHASES)
CONTAINERS = _words(_CONTAINERS)
SHOPS = _words(_SHOPS)
ACTIVITIES = _ACTIVITIES
