"""Tools to attack tvq the way a stranger would: rewrite a pack's manifest (recomputing its
digest, which anyone can do), and prove that nothing outside the output changed.

Not a conftest.py: test modules do ``from conftest import ...`` for the shared fixtures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tvq.pack.manifest import Manifest, manifest_checksum


def read_manifest_json(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def write_manifest_json(pack: Path, manifest: dict) -> None:
    """Write ``manifest`` with a valid digest: the checksum proves integrity, not good intent.
    The digest covers the manifest as tvq parses it (defaults filled in) where it parses."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    try:
        digest = Manifest.model_validate({**body, "digest": ""}).compute_digest()
    except ValidationError:
        digest = manifest_checksum(body)
    (pack / "manifest.json").write_text(json.dumps({**body, "digest": digest}))


def tamper(pack: Path, change: Callable[[dict], object]) -> None:
    """Apply ``change`` to the parsed manifest (in place) and store it re-signed."""
    m = read_manifest_json(pack)
    change(m)
    write_manifest_json(pack, m)


def one_line_refusal(result: Any, *fragments: str) -> str:
    """A CLI run that failed as tvq promises: exit 2, no traceback, and its whole output one
    ``error:`` line holding every fragment. Returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    line = " ".join(lines[0].split())
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (but ``skip``), to show nothing else was touched."""
    out = {}
    for f in sorted(root.rglob("*")):
        if skip is not None and (f == skip or skip in f.parents):
            continue
        if f.is_file() and not f.is_symlink():
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def first_q(m: dict, kind: str = "q") -> tuple[dict, str]:
    """(tensors dict of the first task file, the first tensor name of ``kind``)."""
    tensors = m["files"][m["tasks"][0]["file"]]["tensors"]
    return tensors, next(k for k, e in tensors.items() if e["kind"] == kind)


def every_task_entry(m: dict, key: str) -> list[dict]:
    return [m["files"][t["file"]]["tensors"][key] for t in m["tasks"]]
