"""Texts of the structure study: built-in samples for offline runs, or the samples of a WikiText-style file.

A WikiText-style file (the raw WikiText-2 / -103 dumps) holds articles, each starting at a top-level heading line
`` = Title = `` (one '=' on each side; `` = = Section = = `` lines are sections inside an article). Each article
is one sample, titled by its heading; text before the first heading is a sample titled "(before the first
heading)"; a file without such headings is one sample. WikiText's split-token marks are undone (`` @-@ `` -> ``-``,
`` @,@ `` -> ``,``, `` @.@ `` -> ``.``).

Built-in samples (``builtin_samples``): three English passages written for this study (an encyclopedic article,
a technical explanation, a story) and one source file of Python's standard library (code; held out from the tiny
model's training files), so every run works offline with any model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

from ..platform.rundir import StudyInputError

_HEADING = re.compile(r"^\s*=\s(?!=)(.*?)\s=\s*$")
_MARKS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


@dataclass
class Sample:
    title: str
    text: str


def wikitext_samples(text: str) -> List[Sample]:
    """The samples of a WikiText-style text (module docstring)."""
    samples: List[Sample] = []
    title, lines = "(before the first heading)", []

    def close():
        body = "".join(lines).strip()
        for mark, plain in _MARKS:
            body = body.replace(mark, plain)
        if body:
            samples.append(Sample(title, body + "\n"))

    for line in text.splitlines(keepends=True):
        m = _HEADING.match(line)
        if m:
            close()
            title, lines = m.group(1).strip(), []
        else:
            lines.append(line)
    close()
    return samples


def file_samples(path: str) -> List[Sample]:
    p = Path(path)
    if not p.is_file():
        raise StudyInputError(f"--text {path}: {'a directory' if p.is_dir() else 'no such file'}; give a text file")
    samples = wikitext_samples(p.read_text(encoding="utf-8", errors="replace"))
    if not samples:
        raise StudyInputError(f"--text {path}: the file holds no text")
    return samples


def builtin_samples() -> List[Sample]:
    from ...models import STDLIB_EVAL_FILES, stdlib_text

    return [Sample(title, text) for title, text in _BUILTIN] + [
        Sample(f"Python stdlib {STDLIB_EVAL_FILES[0]} (code)",
               stdlib_text(STDLIB_EVAL_FILES[:1]).decode("utf-8", errors="replace"))]


def samples(path=None) -> List[Sample]:
    """The samples of ``path`` (a WikiText-style file) or the built-in ones."""
    return file_samples(path) if path else builtin_samples()


def pick(all_samples: List[Sample], index: int) -> Sample:
    if not 0 <= index < len(all_samples):
        raise StudyInputError(f"--sample-index: {index} is not accepted; the text has samples "
                              f"0..{len(all_samples) - 1} (list them with --list-samples)")
    return all_samples[index]


def listing(all_samples: List[Sample]) -> str:
    """One line per sample: index, characters, words, title."""
    rows = [f"{'index':>5} {'chars':>8} {'words':>7}  title"]
    rows += [f"{i:>5} {len(s.text):>8} {len(s.text.split()):>7}  {s.title}" for i, s in enumerate(all_samples)]
    return "\n".join(rows)


_BUILTIN = [
    ("Lighthouses of the northern coast (encyclopedic)", """\
The lighthouses of the northern coast form a chain of towers built between the late eighteenth and the early \
twentieth centuries to guide ships through one of the most dangerous stretches of water in the region. The coast \
is low and sandy in the south, where shifting banks lie several miles offshore, and rocky in the north, where \
granite headlands rise above narrow channels. Before the first tower was lit, ships relied on church spires, \
bonfires kept by fishermen and the memory of their pilots, and wrecks were so common that several villages \
earned a living from salvage.

The first permanent light was built in 1791 on the headland known as Black Point. It was a squat stone tower \
eleven metres high, lit by twenty oil lamps set in front of polished copper reflectors. Its keepers complained \
that the reflectors tarnished within a week in the salt air, and captains complained that the light could not \
be told apart from the lamps of the town behind it. A second tower followed in 1804 on the southern banks, \
standing on iron piles driven into the sand, because no stone foundation could be laid there. The pile tower \
swayed in storms, and its first keeper recorded in his log that the oil in the lamps slopped over the rims when \
the wind blew from the west.

The great change came in the middle of the nineteenth century with the adoption of the Fresnel lens. Instead of \
reflecting the light of many lamps, a single bright lamp was placed at the centre of a cage of glass prisms that \
bent its rays into a narrow horizontal beam. A lens of the first order, the largest size, stood more than two \
metres high and could be seen from more than twenty nautical miles on a clear night. To let sailors tell one \
light from another, each tower was given a character: a fixed light, a light that flashed once every ten \
seconds, a group of two flashes, or a light that alternated between white and red. The lens was turned by a \
clockwork driven by a falling weight, which the keeper wound by hand every few hours through the night.

Life at the stations was hard and regular. A typical station had a principal keeper and two assistants, who \
divided the night into watches. They trimmed the wicks, polished the brass and the glass, wound the clockwork, \
painted the tower and wrote the weather into the log every four hours. Stations on the rocks were relieved by \
boat once a fortnight when the sea allowed it, and in winter the relief could be delayed for weeks. Families \
lived at the shore stations, where the keepers kept gardens, goats and chickens, and children rowed to school \
across the bay.

In the twentieth century the lamps changed from oil to paraffin vapour, then to acetylene and finally to \
electricity. Fog signals were added, first bells and guns, later compressed-air horns whose low note carried \
for miles. Radio beacons appeared in the 1920s and allowed ships to take bearings in any weather. One by one the \
stations were automated: a light sensor switched the lamp on at dusk, a lamp changer replaced a failed bulb, \
and a monitoring circuit reported faults by radio to a central depot. The last keepers left the northern coast \
in 1987.

Today most of the towers are still in service, although satellite navigation has made them less important to \
large ships. Several have been turned into museums, where visitors can climb to the lantern room and see the \
lenses that once turned through the night. Others are listed buildings maintained by local trusts. The pile \
tower on the southern banks was replaced by a buoy in 1965, and only its rusted iron legs remain, visible at low \
tide as a row of dark stumps in the sand.
"""),
    ("How a hash table finds a key (technical)", """\
A hash table stores pairs of keys and values so that a value can be found from its key in a time that does not \
grow with the number of entries. It does this by turning each key into a number, called its hash, and using that \
number to choose a slot in an array. If the array has m slots, the slot of a key is usually the hash modulo m. \
Looking up a key then means computing its hash, going to the slot, and checking whether the key stored there is \
the one we want.

The difficulty is that two different keys can land in the same slot. This is called a collision, and it cannot \
be avoided: there are far more possible keys than slots. There are two main families of designs for handling \
collisions. In separate chaining, each slot holds a small list of all the entries whose keys landed there; a \
lookup walks the list and compares keys one by one. In open addressing, every entry lives directly in the \
array, and when a slot is taken the insertion probes other slots in a fixed order until it finds a free one. \
Linear probing tries the next slot, then the one after that; quadratic probing jumps by growing steps; double \
hashing uses a second hash function to decide the step size.

The cost of a lookup depends on the load factor, the number of entries divided by the number of slots. With \
chaining, the expected length of a list equals the load factor, so lookups stay fast even when the table is \
fairly full. With open addressing, the expected number of probes grows quickly as the table fills: for linear \
probing it is roughly one half of one plus one over the square of one minus the load factor for an \
unsuccessful search. For this reason open-addressing tables are usually resized when they are between one half \
and three quarters full. Resizing allocates a larger array, often twice as large, and inserts every entry again, \
because the slot of each key depends on the size of the array.

A good hash function spreads keys evenly over the slots and is cheap to compute. For integers a multiplication \
by a large odd constant followed by a shift works well. For strings, functions that mix each character into a \
running state, such as FNV or the functions of the SipHash family, are common. SipHash was designed to resist \
attackers who choose keys on purpose to collide, which can otherwise turn every lookup into a slow scan: a web \
server that stores request parameters in a hash table can be slowed down this way if its hash function is known \
and simple.

Deleting entries needs care in open addressing. Simply emptying the slot would break the probe sequence of \
other keys that were placed after it, so deleted slots are marked with a special tombstone value that lookups \
skip over and insertions may reuse. Too many tombstones slow the table down, so they are cleared during the \
next resize. Modern implementations add further refinements. Some store a few bits of each hash in a separate \
metadata array so that most comparisons can be rejected without touching the keys; others, like the Swiss table, \
compare sixteen metadata bytes at once with vector instructions. Robin Hood hashing moves entries during \
insertion so that no key sits much farther from its home slot than any other, which makes the longest probe \
sequences short and predictable.

Python's dictionary is an open-addressing table with a perturbed probing sequence that eventually visits every \
slot. Since version 3.6 it also keeps the entries in a dense array in insertion order and uses the sparse table \
only for indices, which saves memory and makes iteration follow the order in which keys were added.
"""),
    ("The clockmaker's apprentice (story)", """\
On the morning the river froze, Tomas arrived at the clockmaker's shop with a letter from his aunt and a pair of \
boots that let in the snow. The shop stood at the end of a narrow street behind the market, and its window was \
full of clocks that all showed different times. The clockmaker, a tall woman named Irena with ink on her fingers \
and spectacles pushed up into her grey hair, read the letter twice, looked at his boots, and told him he could \
sleep in the room above the workshop if he kept the stove lit.

For the first month he was not allowed to touch a clock. He swept the floor, sorted screws by size into glass \
jars, and carried water from the pump. In the evenings Irena let him watch while she worked. She would open a \
case, lift out the movement with two fingers, and lay it on a square of white cloth, where the wheels and \
springs looked as small and exact as the letters in a prayer book. She talked to the clocks while she worked, \
and Tomas soon understood that she was not talking to him.

In the second month she gave him a broken kitchen clock and a set of tools and told him to find out why it had \
stopped. It took him four evenings. The mainspring was fine and the wheels turned freely, but the escapement, \
the little anchor that lets the wheels move one tooth at a time, had a bent pallet. When he showed her, she \
nodded, straightened the pallet with a pair of pliers in one movement, and the clock began to tick. Then she \
bent it again and handed it back to him. He spent another week learning to do what she had done in a second.

By spring he could clean a movement, replace a spring and set a pendulum so that a clock lost no more than a \
minute a week. Customers began to ask for him by name, mostly old men with pocket watches that had belonged to \
their fathers, who liked to stand at the counter and explain exactly how the watch had been dropped. Tomas \
learned to listen to these stories, because they often told him where to look.

One evening in April a woman brought in a tall case clock on a cart pulled by two porters. It had stopped, she \
said, at the moment her husband died, and no one had been able to start it since. Irena opened the door of the \
case, looked inside for a long time, and then told Tomas that this one was his. He found nothing wrong. The \
weights hung freely, the pendulum swung, the wheels were clean. He took the movement apart and put it together \
again three times over three days. On the fourth day he noticed that the case itself stood slightly crooked on \
the uneven floor of the workshop, so that the pendulum touched the back of the case at the end of each swing. \
In the woman's house, he guessed, the floor had been level until something heavy was moved.

He wedged a folded card under one foot of the case, and the clock ran all night. When the woman came back, he \
explained what he had found and showed her how to check the level with a glass of water on top of the case. She \
listened without speaking, paid, and left. Irena, who had been watching from the back of the shop, said only \
that most broken things were not broken where people looked, and went back to her work. Tomas kept the card in \
his pocket for years.
"""),
]
