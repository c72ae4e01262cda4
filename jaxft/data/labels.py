"""Classification labels: the map from label names to class ids, built, checked and saved.

A label map is `{name: id}`. Labels in the data may be names (looked up in the map) or integers
(taken as ids, which must be among the map's ids). Without a given map one is built from the train
labels: sorted names get ids 0..K-1; integer labels keep their values, named by their decimal
string. The map is saved next to the checkpoint so predictions can be read back as names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from jaxft.errors import JaxftError


def build_label_map(labels: Sequence[object], where: str) -> dict[str, int]:
    """A label map covering `labels` (names or non-negative integers, not a mix)."""
    present = {v for v in labels if v is not None}
    if not present:
        raise JaxftError(f"{where}: no labels found")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        if min(present) < 0:
            raise JaxftError(f"{where}: integer labels must be >= 0, found {min(present)}")
        return {str(v): v for v in sorted(present)}
    if all(isinstance(v, str) for v in present):
        return {name: i for i, name in enumerate(sorted(present))}
    kinds = sorted({type(v).__name__ for v in present})
    raise JaxftError(f"{where}: labels must be all names or all integers, found {kinds}")


def load_label_map(spec: Mapping[str, int] | str | os.PathLike) -> dict[str, int]:
    """A label map from a dict or a JSON file `{name: id}`, checked for distinct integer ids."""
    if hasattr(spec, "to_dict"):  # a ConfigDict from the command line
        spec = spec.to_dict()
    if isinstance(spec, (str, os.PathLike)):
        try:
            with open(spec, encoding="utf-8") as fh:
                spec = json.load(fh)
        except FileNotFoundError as e:
            raise JaxftError(f"label map file not found: {spec}") from e
        except json.JSONDecodeError as e:
            raise JaxftError(f"{spec} line {e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(spec, Mapping) or not spec:
        raise JaxftError(f"data.label_map must be a non-empty {{name: id}} mapping, got {spec!r}")
    out = {str(k): v for k, v in spec.items()}
    bad = [k for k, v in out.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise JaxftError(f"data.label_map ids must be integers >= 0; not so for {bad}")
    if len(set(out.values())) != len(out):
        raise JaxftError(f"data.label_map gives two labels the same id: {out}")
    return out


def save_label_map(label_map: Mapping[str, int], path: str | os.PathLike) -> None:
    """Write `{name: id}` as JSON (sorted by id), the form `load_label_map` reads back."""
    ordered = dict(sorted(label_map.items(), key=lambda kv: kv[1]))
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(ordered, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def label_id(value: object, label_map: Mapping[str, int], ids: frozenset[int]) -> int:
    """The class id of one label, or ValueError naming the label and the known ones."""
    if isinstance(value, str) and value in label_map:
        return label_map[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in ids:
        return value
    known = ", ".join(list(label_map)[:20]) + (", ..." if len(label_map) > 20 else "")
    raise ValueError(f"label {value!r} is not in the label map ({known})")
