"""A tiny hand-written two-class corpus: real sentences for real-model tests without downloads."""

from __future__ import annotations

import json
from pathlib import Path

ANIMALS = [
    "The cat sleeps on the warm windowsill.", "A dog barked at the mail carrier.", "Horses graze in the green field.",
    "The owl hunts mice at night.", "Dolphins swim in large groups.", "A rabbit hid under the hedge.",
    "The cow gave birth to a calf.", "Bees collect nectar from flowers.", "The parrot repeated every word.",
    "A fox crept into the henhouse.", "Sheep were sheared in spring.", "The whale surfaced to breathe.",
    "Ants carried crumbs to their nest.", "The goat climbed the rocky hill.", "A snake basked on the stone.",
    "The lion rested in the shade.",
]
COMPUTERS = [
    "The compiler reported a syntax error.", "Restart the server after the update.", "The laptop battery drains quickly.",
    "Install the package with pip.", "The database query timed out.", "A segmentation fault crashed the program.",
    "The GPU renders frames faster.", "Back up your files to the cloud.", "The kernel scheduler picks the next thread.",
    "Press Ctrl+C to stop the script.", "The router dropped the connection.", "The spreadsheet formula returned an error.",
    "Version control keeps the history.", "The keyboard stopped responding.", "Encrypt the disk before shipping it.",
    "The web page loads slowly.",
]
EXAMPLES = [(t, 0) for t in ANIMALS] + [(t, 1) for t in COMPUTERS]


def write_jsonl(path: Path, examples: list[tuple[str, int]] = EXAMPLES) -> Path:
    names = ["animals", "computers"]
    path.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in examples))
    return path
