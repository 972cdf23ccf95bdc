"""Reader for a local class-folder layout: `<root>/<count>/<image>.jpg`."""

from __future__ import annotations

from pathlib import Path

from counting.sources.base import Item, Listing, Skip, image_id, is_image_name, keep_first_per_id


def count_folders(root: Path) -> list[tuple[int, Path]]:
    """The sub-folders of `root` named by a count, in count order."""
    return sorted((int(entry.name), entry) for entry in root.iterdir() if entry.is_dir() and entry.name.isdigit())


def list_class_folders(root: Path, pairs: list[tuple[str, int]] | None = None) -> Listing:
    """Every image under `<root>/<count>/`, labelled by its folder.

    With `pairs` (id, count) from a file list, only listed images are kept; a folder that disagrees with the
    list, and a listed id with no image, become Skips.
    """
    root = Path(root).expanduser().resolve()
    skipped: list[Skip] = []
    items = []
    for count, folder in count_folders(root):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            if is_image_name(path.name):
                items.append(Item(image_id(path.name), count, str(path)))
            else:
                skipped.append(Skip(str(path), f"not an image file: {path}"))
    items = keep_first_per_id(items, skipped)
    if pairs is None:
        return Listing(items, skipped)
    listed = keep_first_per_id((Item(id_, count, f"{root}/<count>/{id_}.jpg") for id_, count in pairs), skipped)
    found = {item.id: item for item in items}
    selected = []
    for entry in listed:
        item = found.get(entry.id)
        if item is None:
            skipped.append(Skip(entry.key, f"image not found: listed id {entry.id} has no image under {root}"))
        elif item.count != entry.count:
            skipped.append(Skip(item.key, f"count mismatch: folder says {item.count}, listing says {entry.count}"))
        else:
            selected.append(item)
    return Listing(selected, skipped)
