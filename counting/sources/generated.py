"""Synthetic storage-bin photos with metadata, written in the Amazon Bin Image Dataset (ABID) layout.

Each bin is a pale fabric tote seen from the front, holding `count` items (boxes, pouches, bottles, bagged
goods; products repeat) behind horizontal elastic bands, with a bin label at the bottom edge. Every image is drawn
from its own random generator seeded by (seed, index), so any one of them can be regenerated alone and the whole
output is byte-identical for the same arguments.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont
from tqdm import tqdm

SCALE = 0.5  # images are drawn at half of ABID's pixel sizes to keep generation fast
JPEG_QUALITY = 88
JPEG_SMOOTHING = (40, 101)  # range of the JPEG encoder's input smoothing, for the camera's mild blur
ABID_WIDTH = (360, 710)
ABID_HEIGHT = (280, 960)
ASPECT = (0.6, 1.9)  # height / width
MIN_VISIBLE = 0.35  # fraction of every item left unoccluded by the items in front of it
LAYOUT_TRIES = 12
FILL = 0.6  # items are scaled down where their total area would pass this fraction of the bin's front
ARRANGEMENTS_PER_POSE = 3  # layout tries between re-posing the items a little smaller
BAND_SUPERSAMPLE = 4  # band threads are drawn at this many times the vertical resolution
LIGHT_GRID = (24, 12)  # rows, columns of the light field, smoothly stretched over the image
_LIGHT_MAX = 1.25  # light is stored in 8 bits as a fraction of this
_LIGHT_LUT = [min(255, round(i * _LIGHT_MAX)) for i in range(256)] * 3

_ASIN_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
_BRANDS = ("Acme", "Northwind", "Bluebird", "Evergreen", "Summit", "Harbor", "Kestrel", "Maple & Co", "Orion",
           "Pinecrest", "Quartz", "Redwood", "Silverline", "Tidewater", "Vanta", "Willow", "Zephyr", "Brightside")
_PRODUCTS = {
    "box": ("Board Game", "Blu-ray", "LED Desk Lamp", "Phone Case", "Vegetable Spiralizer", "Puzzle, 500 Pieces",
            "Vitamin D3 Softgels, 120 Count", "Wireless Mouse", "Paperback Novel", "Tea Sampler, 40 Bags"),
    "pouch": ("Dog Treats, 6 oz", "Whole Bean Coffee, 12 oz", "Trail Mix", "Protein Powder, 2 lb",
              "Organic Chia Seeds, 16 oz", "Bath Salts"),
    "bottle": ("Shampoo, 12 fl oz", "Hand Lotion", "Liver Support, 60 Veggie Capsules", "Olive Oil, 500 ml",
               "Multivitamin Gummies", "Glass Cleaner"),
    "bag": ("Cable Ties, Pack of 100", "Cotton T-Shirt, Medium", "Phone Charger Cable, 6 ft", "Wool Socks",
            "Silicone Baking Mat", "Microfiber Cloths, Pack of 12"),
}
_KINDS = tuple(_PRODUCTS)
_KIND_WEIGHTS = (0.5, 0.17, 0.15, 0.18)
_PALETTES = (
    ((28, 28, 34), (60, 52, 48), (20, 34, 60)),              # dark print
    ((232, 230, 222), (245, 243, 236), (210, 212, 214)),      # white print
    ((176, 134, 92), (160, 120, 80), (190, 160, 120)),        # cardboard
    ((176, 38, 36), (30, 80, 160), (40, 120, 70), (220, 120, 30), (110, 50, 120), (230, 200, 40)),  # colour
)


@dataclass(frozen=True)
class _Product:
    """One distinct item: its metadata and its front-face picture (RGBA sprite)."""
    asin: str
    name: str
    normalized_name: str
    dimensions: tuple[float, float, float]  # length, width, height in inches
    weight: float
    sprite: Image.Image


def generate_abid_layout(root: Path, n_images: int, seed: int = 0, min_count: int = 1, max_count: int = 5,
                         progress: bool = True) -> Path:
    """Write `n_images` synthetic bins to `root/bin-images/<id>.jpg` and `root/metadata/<id>.json`; return root.

    Ids are `00001`, `00002`, ... Counts cycle through min_count..max_count in shuffled blocks, so classes are
    balanced (sizes differ by at most one). Files already in `root` with other ids are left alone.
    """
    _check_int("n_images", n_images, minimum=1)
    _check_int("seed", seed, minimum=0)
    _check_counts(min_count, max_count)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root {root} exists and is not a directory")
    images_dir, metadata_dir = root / "bin-images", root / "metadata"
    images_dir.mkdir(parents=True, exist_ok=True)
    metadata_dir.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(n_images), desc="generating bins", unit="image", disable=not progress):
        count = bin_count(seed, index, min_count, max_count)
        jpeg, metadata = make_bin(seed, index, count)
        image_id = f"{index + 1:05d}"
        (images_dir / f"{image_id}.jpg").write_bytes(jpeg)
        (metadata_dir / f"{image_id}.json").write_text(json.dumps(metadata, indent=4, sort_keys=True))
    return root


def bin_count(seed: int, index: int, min_count: int, max_count: int) -> int:
    """Object count of image `index`: each block of (max_count - min_count + 1) images holds every count once."""
    _check_int("seed", seed, minimum=0)
    _check_int("index", index, minimum=0)
    _check_counts(min_count, max_count)
    n_classes = max_count - min_count + 1
    block, position = divmod(index, n_classes)
    order = np.random.default_rng([seed, 0, block]).permutation(n_classes)
    return min_count + int(order[position])


def make_bin(seed: int, index: int, count: int) -> tuple[bytes, dict]:
    """Draw bin `index` of `seed` holding `count` items; return its JPEG bytes and its ABID metadata."""
    _check_int("seed", seed, minimum=0)
    _check_int("index", index, minimum=0)
    _check_int("count", count, minimum=0)
    rng = np.random.default_rng([seed, 1, index])
    width, height = _image_size(rng)
    canvas, interior = _draw_tote(rng, width, height)
    products = _make_products(rng, count, interior)
    quantities = _split_quantity(rng, count, len(products))
    _place_items(rng, canvas, interior, [p.sprite for p, q in zip(products, quantities) for _ in range(q)])
    _draw_front_lip(rng, canvas, interior)
    _draw_clutter(rng, canvas, interior)
    _draw_bands(rng, canvas, interior)
    image = _light(rng, canvas)
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, smooth=int(rng.integers(*JPEG_SMOOTHING)))  # mild blur
    return buffer.getvalue(), _metadata(products, quantities)


def _check_int(name: str, value: object, minimum: int, minimum_name: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        bound = f"{minimum_name} ({minimum})" if minimum_name else str(minimum)
        raise ValueError(f"{name} must be >= {bound}, got {value}")


def _check_counts(min_count: int, max_count: int) -> None:
    _check_int("min_count", min_count, minimum=0)
    _check_int("max_count", max_count, minimum=min_count, minimum_name="min_count")


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    width = rng.uniform(*ABID_WIDTH)
    height = float(np.clip(rng.uniform(*ABID_HEIGHT), ASPECT[0] * width, ASPECT[1] * width))
    return round(width * SCALE), round(height * SCALE)


def _clip8(value: float) -> int:
    return max(0, min(255, int(value)))


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, int, int]:
    return tuple(_clip8(c * factor) for c in colour[:3])


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: float) -> tuple[int, int, int]:
    return tuple(_clip8(c + noise) for c, noise in zip(colour[:3], rng.normal(0, amount, 3)))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size)


@dataclass(frozen=True)
class _Interior:
    """Tote geometry: the back wall spans x0..x1 from top to floor; the front lip (a polygon) hides the bottom."""
    x0: int
    x1: int
    top: int
    floor: int
    front: int
    lip: tuple[tuple[float, float], ...]
    fabric: tuple[int, int, int]


def _draw_tote(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, _Interior]:
    """Fabric tote behind the items: back wall with creases, darker side walls, floor and the metal frame on top."""
    fabric = _shade(_jitter(rng, (208, 178, 124), 3), rng.uniform(0.92, 1.08))
    frame = int(height * rng.uniform(0.02, 0.06))
    front = height - int(height * rng.uniform(0.09, 0.15))
    floor = int(frame + (front - frame) * rng.uniform(0.82, 0.95))
    left = int(width * rng.uniform(0.03, 0.12))
    right = width - int(width * rng.uniform(0.03, 0.12))
    drop = int(height * rng.uniform(0.0, 0.05))
    image = Image.new("RGB", (width, height), _shade(fabric, 0.8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, frame, right, floor), fill=_shade(fabric, rng.uniform(0.6, 0.76)))  # back wall
    side = rng.uniform(0.72, 0.86, 2)
    draw.polygon([(0, frame), (left, frame + drop), (left, floor), (0, height)], fill=_shade(fabric, side[0]))
    draw.polygon([(width, frame), (right, frame + drop), (right, floor), (width, height)], fill=_shade(fabric, side[1]))
    draw.polygon([(left, floor), (right, floor), (width, height), (0, height)], fill=_shade(fabric, 0.76))
    for x in (left, right):  # corner folds
        draw.line([(x, frame + drop), (x + int(rng.integers(-3, 4)), floor)], fill=_shade(fabric, 0.66), width=2)
    for _ in range(int(rng.integers(1, 4))):  # creases in the back wall
        x = rng.uniform(left, right)
        draw.line([(x, frame), (x + rng.uniform(-8, 8), floor)], fill=_shade(fabric, rng.uniform(0.7, 0.95)), width=1)
    back_fold = frame + int((floor - frame) * rng.uniform(0.0, 0.2))
    draw.line([(left, back_fold), (right, back_fold)], fill=_shade(fabric, 0.7), width=1)
    for edge in (0, width):  # front edges of the side walls, in full light
        flap = width * rng.uniform(0.0, 0.04)
        draw.polygon([(edge, frame), (abs(edge - flap), frame), (abs(edge - flap * 0.5), height), (edge, height)],
                     fill=_shade(fabric, 0.97))
    draw.rectangle((0, 0, width, frame), fill=_shade(fabric, rng.uniform(0.9, 1.05)))  # front of the bin above
    if rng.random() < 0.8:  # its label, cut by the image edge
        _draw_bin_label(rng, draw, width, -int(frame * rng.uniform(0.2, 0.8)), frame - 1)
    gray = int(rng.uniform(110, 175))
    draw.line([(0, frame), (width, frame)], fill=(gray, gray, gray - 4), width=int(rng.integers(2, 4)))
    bow = height * rng.uniform(0.0, 0.035)
    xs = np.linspace(0, width, 9)
    edge_ys = front + bow * (1 - (2 * xs / width - 1) ** 2)  # the front sags in the middle
    lip = (*zip(xs.tolist(), edge_ys.tolist()), (width, height), (0, height))
    return image, _Interior(left, right, frame, floor, front, lip, fabric)


def _draw_front_lip(rng: np.random.Generator, canvas: Image.Image, interior: _Interior) -> None:
    """Front wall of the tote in full light, in front of the items' feet, with the bin label on it."""
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    draw.polygon(interior.lip, fill=_shade(interior.fabric, 1.05))
    draw.line(interior.lip[:-2], fill=_shade(interior.fabric, 1.1), width=2)
    _draw_bin_label(rng, draw, width, height - int(height * rng.uniform(0.055, 0.075)), height)


def _draw_bin_label(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, top: int, bottom: int) -> None:
    """Small white bin label: a coloured part with a short printed code and a square barcode."""
    label_h = max(6, bottom - top - 2)
    label_w = int(label_h * rng.uniform(3.5, 5.0))
    x = int(rng.uniform(0.25, 0.65) * width)
    draw.rectangle((x, top, x + label_w, top + label_h), fill=(236, 236, 232))
    tag = ((190, 40, 40), (40, 60, 120), (90, 60, 50), (40, 90, 90), (60, 50, 90), (225, 225, 225))
    colour = tag[int(rng.integers(len(tag)))]
    split = x + int(label_w * 0.58)
    draw.rectangle((x + 1, top + 1, split, top + label_h - 1), fill=colour)
    ink = (20, 20, 20) if sum(colour) > 500 else (240, 240, 240)
    code = f"{rng.integers(1, 4)}{'ABCDEFGHJ'[int(rng.integers(9))]}"
    font = _font(max(5, int(label_h * 0.75)))
    draw.text((x + 3, top + label_h * 0.12), code, fill=ink, font=font)
    arrow_x = x + 4 + draw.textlength(code, font=font)
    arrow_w = label_h * 0.2
    draw.line([(arrow_x + arrow_w, top + label_h * 0.25), (arrow_x + arrow_w, top + label_h * 0.85)], fill=ink)
    draw.polygon([(arrow_x, top + label_h * 0.4), (arrow_x + 2 * arrow_w, top + label_h * 0.4),
                  (arrow_x + arrow_w, top + label_h * 0.15)], fill=ink)
    cells = rng.random((7, 7)) < 0.5
    cell = max(1, (label_h - 2) // 7)
    qx, qy = split + 2, top + max(1, (label_h - 7 * cell) // 2)
    for row, col in zip(*np.nonzero(cells)):
        draw.rectangle((qx + col * cell, qy + row * cell, qx + col * cell + cell - 1, qy + row * cell + cell - 1),
                       fill=(25, 25, 25))


def _make_products(rng: np.random.Generator, count: int, interior: _Interior) -> list[_Product]:
    """Between 1 and `count` distinct products (fewer is likelier, so products repeat), drawn to the bin's scale."""
    if count == 0:
        return []
    n_products = int(min(count, rng.geometric(0.45)))
    pixels_per_inch = (interior.x1 - interior.x0) / rng.uniform(8, 13)
    products: list[_Product] = []
    while len(products) < n_products:
        product = _make_product(rng, pixels_per_inch, count)
        if all(other.asin != product.asin for other in products):
            products.append(product)
    return products


def _make_product(rng: np.random.Generator, pixels_per_inch: float, count: int) -> _Product:
    """A product with random kind, name and size (inches), and its picture at the bin's scale."""
    kind = _KINDS[int(rng.choice(len(_KINDS), p=_KIND_WEIGHTS))]
    length, width, height = sorted(rng.uniform(0.6, 11.0, 3).round(2).tolist(), reverse=True)
    length = max(length, 4.0)
    width = max(width, 2.5)
    face = [length, width] if rng.random() < 0.6 else [length, max(height, 1.2)]
    if kind == "bottle":
        face = [max(length, 4.0), min(width, length * 0.45)]
    shrink = 1.0 - 0.07 * max(0, count - 2)  # crowded bins hold smaller goods
    face_px = [max(10, int(side * pixels_per_inch * shrink)) for side in face]
    upright = kind == "bottle" or rng.random() < 0.6
    size = (min(face_px), max(face_px)) if upright else (max(face_px), min(face_px))
    sprite = _SPRITES[kind](rng, size)
    brand = _BRANDS[int(rng.integers(len(_BRANDS)))]
    product = _PRODUCTS[kind][int(rng.integers(len(_PRODUCTS[kind])))]
    name = f"{brand} {product}"
    pack = rng.integers(2, 25)
    if rng.random() < 0.15 and "Pack of" not in name:
        name, normalized = f"{name}, Pack of {pack}", f"Pack of {pack} {name}"
    else:
        normalized = name
    asin = "B0" + "".join(rng.choice(_ASIN_CHARS, 8))
    weight = round(float(length * width * height * rng.uniform(0.002, 0.02)), 3)
    return _Product(asin, name, normalized, (length, width, height), weight, sprite)


def _split_quantity(rng: np.random.Generator, count: int, n_products: int) -> list[int]:
    """Split `count` into `n_products` positive quantities."""
    if n_products == 0:
        return []
    cuts = np.sort(rng.choice(np.arange(1, count), n_products - 1, replace=False)) if n_products > 1 else []
    edges = [0, *map(int, cuts), count]
    return [b - a for a, b in zip(edges, edges[1:])]


def _metadata(products: list[_Product], quantities: list[int]) -> dict:
    items = {}
    for product, quantity in zip(products, quantities):
        length, width, height = product.dimensions
        items[product.asin] = {
            "asin": product.asin,
            "height": {"unit": "IN", "value": height},
            "length": {"unit": "IN", "value": length},
            "name": product.name,
            "normalizedName": product.normalized_name,
            "quantity": quantity,
            "weight": {"unit": "pounds", "value": product.weight},
            "width": {"unit": "IN", "value": width},
        }
    return {"BIN_FCSKU_DATA": items, "EXPECTED_QUANTITY": sum(quantities)}


# ---- item pictures -------------------------------------------------------------------------------------------

def _print_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A base colour and a contrasting ink colour for printed packaging."""
    palette = _PALETTES[int(rng.choice(len(_PALETTES), p=(0.3, 0.3, 0.15, 0.25)))]
    base = _muted(rng, palette[int(rng.integers(len(palette)))])
    if sum(base) > 450:
        ink = _muted(rng, ((30, 30, 30), (40, 60, 140), (170, 30, 30))[int(rng.integers(3))])
    else:
        ink = _jitter(rng, (235, 232, 225), 8)
    return base, ink


def _muted(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """A printed colour as the camera sees it: jittered and less saturated."""
    jittered = np.array(_jitter(rng, colour, 10), dtype=np.float32)
    grey = jittered.mean()
    return tuple(int(c) for c in grey + (jittered - grey) * rng.uniform(0.6, 0.9))


def _text_lines(rng: np.random.Generator, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
                ink: tuple[int, ...]) -> None:
    """Rows of word-like dashes filling `box`, like printed text seen from afar."""
    x0, y0, x1, y1 = box
    line_h = int(rng.integers(2, 5))
    y = y0
    while y + line_h <= y1:
        x = x0 + int(rng.integers(0, 3))
        end = x0 + (x1 - x0) * rng.uniform(0.5, 1.0)
        while x < end:
            word = int(rng.integers(2, 9))
            draw.rectangle((x, y, min(x + word, x1), y + line_h - 2), fill=ink)
            x += word + int(rng.integers(2, 4))
        y += line_h + int(rng.integers(1, 3))


def _barcode(rng: np.random.Generator, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=(240, 240, 236))
    x = x0 + 1
    while x < x1 - 1:
        bar = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            draw.rectangle((x, y0 + 1, min(x + bar - 1, x1 - 1), y1 - 1), fill=(20, 20, 20))
        x += bar


def _box_sprite(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Printed box: front face with a lighter top edge, text rows, a picture or logo and sometimes a barcode."""
    w, h = size
    base, ink = _print_colours(rng)
    sprite = Image.new("RGBA", size, base + (255,))
    draw = ImageDraw.Draw(sprite)
    top = max(1, int(h * rng.uniform(0.04, 0.12)))
    draw.rectangle((0, 0, w, top), fill=_shade(base, 1.25 if sum(base) < 450 else 0.9))
    if rng.random() < 0.6:  # picture panel
        px0, py0 = int(w * rng.uniform(0.05, 0.4)), int(h * rng.uniform(0.15, 0.5))
        px1, py1 = px0 + int(w * rng.uniform(0.3, 0.55)), py0 + int(h * rng.uniform(0.2, 0.4))
        panel = _muted(rng, _PALETTES[3][int(rng.integers(len(_PALETTES[3])))])
        draw.rectangle((px0, py0, px1, py1), fill=panel)
        if px1 - px0 > 6 and py1 - py0 > 6:
            draw.ellipse((px0 + 2, py0 + 2, px1 - 2, py1 - 2), fill=_shade(panel, rng.uniform(0.6, 1.4)))
    elif rng.random() < 0.6:  # big logo
        r = int(min(w, h) * rng.uniform(0.15, 0.3))
        cx, cy = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.25, 0.6))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    _text_lines(rng, draw, (int(w * 0.1), top + 2, int(w * 0.9), top + 2 + int(h * rng.uniform(0.1, 0.2))), ink)
    _text_lines(rng, draw, (int(w * 0.1), int(h * 0.72), int(w * 0.85), int(h * 0.92)), ink)
    if rng.random() < 0.4 and w > 16 and h > 16:
        bx, by = int(w * rng.uniform(0.5, 0.7)), int(h * rng.uniform(0.55, 0.8))
        _barcode(rng, draw, (bx, by, min(w - 2, bx + max(8, w // 4)), min(h - 2, by + max(5, h // 8))))
    draw.rectangle((0, 0, w - 1, h - 1), outline=_shade(base, 0.55))
    return sprite


def _pouch_sprite(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Stand-up pouch: tapered outline, a seal strip at the top, a window or logo and a glossy streak."""
    w, h = size
    base, ink = _print_colours(rng)
    sprite = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    outline = [(int(w * 0.04), 0), (w - 1 - int(w * 0.04), 0), (w - 1, h - 1), (0, h - 1)]
    draw.polygon(outline, fill=base + (255,), outline=_shade(base, 0.6) + (255,))
    seal = max(2, int(h * 0.07))
    draw.rectangle((int(w * 0.05), 1, w - 2 - int(w * 0.05), seal), fill=_shade(base, 0.8) + (255,))
    if rng.random() < 0.5:
        window = _jitter(rng, (150, 110, 70), 30)  # contents seen through a clear window
        draw.ellipse((int(w * 0.2), int(h * 0.3), int(w * 0.8), int(h * 0.7)), fill=window + (255,))
    else:
        draw.rectangle((int(w * 0.15), int(h * 0.25), int(w * 0.85), int(h * 0.45)), fill=ink + (255,))
    _text_lines(rng, draw, (int(w * 0.15), int(h * 0.55), int(w * 0.85), int(h * 0.85)), ink + (255,))
    pixels = np.asarray(sprite, dtype=np.float32)
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    gloss = np.exp(-((xs - rng.uniform(0.15, 0.85)) / 0.08) ** 2) * rng.uniform(40, 90)
    pixels[:, :, :3] += gloss[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _bottle_sprite(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Bottle or jar: cap, shoulders, round body with a wrap label, shaded like a cylinder."""
    w, h = size
    base, ink = _print_colours(rng)
    sprite = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    cap_h = max(2, int(h * rng.uniform(0.08, 0.16)))
    neck = rng.uniform(0.35, 0.95)
    cap_w = max(2, int(w * neck * 0.8))
    cap = _jitter(rng, ((240, 240, 240), (30, 30, 30), (200, 40, 40), (40, 80, 160))[int(rng.integers(4))], 8)
    draw.rectangle(((w - cap_w) // 2, 0, (w + cap_w) // 2, cap_h), fill=cap + (255,))
    shoulder = cap_h + int(h * 0.12 * (1 - neck))
    draw.polygon([((w - cap_w) // 2, cap_h), ((w + cap_w) // 2, cap_h), (w - 1, shoulder), (0, shoulder)],
                 fill=base + (255,))
    draw.rounded_rectangle((0, shoulder, w - 1, h - 1), radius=max(1, w // 8), fill=base + (255,))
    label_top = shoulder + int((h - shoulder) * rng.uniform(0.1, 0.3))
    label_bottom = h - int((h - shoulder) * rng.uniform(0.1, 0.25))
    label, label_ink = _print_colours(rng)
    draw.rectangle((0, label_top, w - 1, label_bottom), fill=label + (255,))
    _text_lines(rng, draw, (int(w * 0.15), label_top + 2, int(w * 0.85), label_bottom - 2), label_ink + (255,))
    pixels = np.asarray(sprite, dtype=np.float32)
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    cylinder = 0.65 + 0.35 * np.sqrt(np.clip(1 - xs ** 2, 0, 1)) + 0.25 * np.exp(-((xs + 0.45) / 0.12) ** 2)
    pixels[:, :, :3] *= cylinder[None, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _bag_sprite(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Goods in a clear polybag: a hazy sheet over the contents, crinkle highlights and a white sticker."""
    w, h = size
    contents, ink = _print_colours(rng)
    sprite = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    corners = [(rng.uniform(0, 0.08) * w, rng.uniform(0, 0.08) * h), (w - 1 - rng.uniform(0, 0.08) * w, 0),
               (w - 1, h - 1 - rng.uniform(0, 0.08) * h), (rng.uniform(0, 0.08) * w, h - 1)]
    draw.polygon(corners, fill=(228, 228, 224, 255))
    inset_x, inset_y = int(w * rng.uniform(0.08, 0.2)), int(h * rng.uniform(0.08, 0.2))
    draw.rounded_rectangle((inset_x, inset_y, w - 1 - inset_x, h - 1 - inset_y), radius=max(1, min(w, h) // 6),
                           fill=contents + (255,))
    if rng.random() < 0.5:
        _text_lines(rng, draw, (inset_x + 2, inset_y + 2, w - inset_x - 2, inset_y + (h - 2 * inset_y) // 3),
                    ink + (255,))
    pixels = np.asarray(sprite, dtype=np.float32)
    haze = rng.uniform(0.25, 0.5)
    pixels[:, :, :3] = pixels[:, :, :3] * (1 - haze) + 235 * haze
    sprite = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(sprite)
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.2, 0.6) * min(w, h)
        draw.line([(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))], fill=(250, 250, 250, 255))
    sx, sy = int(w * rng.uniform(0.1, 0.5)), int(h * rng.uniform(0.5, 0.75))
    sticker = (sx, sy, min(w - 2, sx + max(6, w // 3)), min(h - 2, sy + max(4, h // 7)))
    _barcode(rng, draw, sticker)
    return sprite


_SPRITES = {"box": _box_sprite, "pouch": _pouch_sprite, "bottle": _bottle_sprite, "bag": _bag_sprite}


# ---- scene -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Picture:
    """An item as it appears: its posed (scaled, rotated) sprite, opaque mask and opaque area in pixels."""
    image: Image.Image
    mask: Image.Image
    area: int


@dataclass(frozen=True)
class _Placement:
    """Where an item goes: top-left corner in the image and depth (0: back, 1: front; drawn back to front)."""
    picture: _Picture
    x: int
    y: int
    depth: float


def _place_items(rng: np.random.Generator, canvas: Image.Image, interior: _Interior,
                 sprites: list[Image.Image]) -> None:
    """Stand, lean and stack the items, back to front, so that each one stays at least partly visible.

    Crowded layouts are rearranged, and after every few tries the items are posed anew, a little smaller.
    """
    if not sprites:
        return
    pictures: list[_Picture] = []
    best: tuple[float, list[_Placement]] = (-1.0, [])
    for attempt in range(LAYOUT_TRIES):
        if attempt % ARRANGEMENTS_PER_POSE == 0:
            pictures = _pose(rng, interior, sprites, shrink=0.9 ** (attempt // ARRANGEMENTS_PER_POSE))
        placements = _arrange(rng, interior, sprites, pictures)
        least_visible = float(_visible_fractions(canvas.size, placements, interior.lip).min())
        if least_visible > best[0]:
            best = (least_visible, placements)
        if least_visible >= MIN_VISIBLE:
            break
    for placement in sorted(best[1], key=lambda p: p.depth):
        canvas.paste(placement.picture.image, (placement.x, placement.y), placement.picture.image)


def _pose(rng: np.random.Generator, interior: _Interior, sprites: list[Image.Image],
          shrink: float) -> list[_Picture]:
    """Scale every item to fit the bin and stand it upright, leaning, or lying on its side."""
    span = interior.x1 - interior.x0
    room = interior.front - interior.top
    crowding = math.sqrt(FILL * span * room / sum(sprite.width * sprite.height for sprite in sprites))
    scaled: dict[int, Image.Image] = {}
    pictures = []
    for sprite in sprites:
        if id(sprite) not in scaled:
            w, h = sprite.size
            scale = min(shrink, shrink * crowding, room * 0.85 / h, span * 0.8 / w)
            size = (max(4, int(w * scale)), max(4, int(h * scale)))
            scaled[id(sprite)] = sprite if size == sprite.size else sprite.resize(size, Image.BILINEAR)
        picture = scaled[id(sprite)]
        if rng.random() < 0.2 and picture.height < span * 0.8:  # lying on its side
            lean = 90 + rng.normal(0, 4)
        elif rng.random() < 0.85:
            lean = rng.normal(0, 5)
        else:
            lean = rng.choice([-1, 1]) * rng.uniform(12, 30)
        posed = picture.rotate(float(lean), resample=Image.NEAREST, expand=True)
        mask = posed.getchannel("A").convert("1", dither=Image.Dither.NONE)
        pictures.append(_Picture(posed, mask, max(1, int(np.count_nonzero(np.asarray(mask))))))
    return pictures


def _arrange(rng: np.random.Generator, interior: _Interior, sprites: list[Image.Image],
             pictures: list[_Picture]) -> list[_Placement]:
    """Items stand in columns spread across the bin, one product's items next to each other; some are stacked on
    the item below; columns at the back stand higher than those at the front."""
    span = interior.x1 - interior.x0
    room = interior.front - interior.top
    columns: list[list[int]] = []
    for i, picture in enumerate(pictures):
        if columns:
            below = columns[-1]
            stack_chance = 0.45 if sprites[below[-1]] is sprites[i] else 0.2
            height = sum(pictures[j].image.height for j in below) + picture.image.height
            if rng.random() < stack_chance and height < room * 0.9:
                below.append(i)
                continue
        columns.append([i])
    centres = interior.x0 + span * (np.arange(len(columns)) + rng.uniform(0.25, 0.75, len(columns))) / len(columns)
    placements = []
    for column, centre in zip(columns, centres):
        depth = rng.uniform(0, 1)
        bottom = _ground(interior, depth)
        for level, i in enumerate(column):
            pw, ph = pictures[i].image.size
            x = float(np.clip(centre - pw / 2 + rng.normal(0, pw * 0.08), interior.x0 - pw * 0.25,
                              interior.x1 - pw * 0.75))
            placements.append(_Placement(pictures[i], int(x), int(bottom - ph), depth + 0.01 * level))
            bottom -= ph * 0.92
    return placements


def _ground(interior: _Interior, depth: float) -> float:
    """Where an item at `depth` (0: back, 1: front) stands; items at the front have their feet behind the lip."""
    bottom = interior.front + 0.4 * (interior.lip[-1][1] - interior.front)
    return interior.floor + depth * (bottom - interior.floor)


def _visible_fractions(size: tuple[int, int], placements: list[_Placement],
                       lip: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Fraction of each item's pixels not covered by items drawn after it or by the front lip (and inside the image)."""
    owner = Image.new("L", size, 0)
    ordered = sorted(placements, key=lambda p: p.depth)
    for rank, placement in enumerate(ordered, start=1):
        owner.paste(rank, (placement.x, placement.y), placement.picture.mask)
    ImageDraw.Draw(owner).polygon(lip, fill=0)
    visible = np.bincount(np.asarray(owner).ravel(), minlength=len(ordered) + 1)[1:]
    return visible / np.array([placement.picture.area for placement in ordered])


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image, interior: _Interior) -> None:
    """Sometimes a rod, hook or cable crosses the view."""
    if rng.random() > 0.3:
        return
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    y0 = rng.uniform(interior.top, interior.front)
    y1 = float(np.clip(y0 + rng.normal(0, height * 0.1), interior.top, interior.front))
    x0, x1 = (0.0, rng.uniform(0.4, 1.0) * width) if rng.random() < 0.5 else (rng.uniform(0, 0.6) * width, width)
    metal = _jitter(rng, ((200, 190, 150), (160, 160, 165), (40, 40, 40))[int(rng.integers(3))], 8)
    draw.line([(x0, y0), (x1, y1)], fill=metal, width=int(rng.integers(1, 4)))
    if rng.random() < 0.5:  # hook at the free end
        end = (x1, y1) if x0 == 0 else (x0, y0)
        r = rng.uniform(3, 7)
        draw.arc((end[0] - r, end[1] - 2 * r, end[0] + r, end[1]), 0, 270, fill=(190, 190, 195), width=2)


def _draw_bands(rng: np.random.Generator, canvas: Image.Image, interior: _Interior) -> None:
    """Two to four elastic bands across the whole width, each made of many thin pale threads with gaps."""
    width, height = canvas.size
    n_bands = int(rng.integers(2, 5))
    usable = interior.front - interior.top
    slots = np.sort(rng.choice(n_bands * 3, n_bands, replace=False))
    fine = BAND_SUPERSAMPLE
    mask = Image.new("L", (width // 2, height * fine), 0)  # threads are drawn finer, then smoothed to size
    draw = ImageDraw.Draw(mask)
    for slot in slots:
        band_h = usable * rng.uniform(0.15, 0.26) * 3 / (n_bands + 1)
        centre = interior.top + usable * (slot + rng.uniform(0.3, 0.7)) / (n_bands * 3)
        tilt = rng.normal(0, height * 0.015)
        n_threads = int(band_h / rng.uniform(1.7, 2.5))
        for k in range(n_threads):
            if rng.random() < 0.1:  # gap
                continue
            offset = (k / max(1, n_threads - 1) - 0.5) * band_h
            fan = rng.normal(0, 0.3)
            y_left = centre + offset + fan
            y_right = centre + offset + tilt - fan
            draw.line([(0, y_left * fine), (width // 2, y_right * fine)], fill=int(rng.uniform(190, 255)),
                      width=int(rng.integers(3, 6)))
    threads = Image.new("RGB", canvas.size, _jitter(rng, (246, 245, 240), 4))
    canvas.paste(threads, (0, 0), mask.resize(canvas.size, Image.BILINEAR))


def _light(rng: np.random.Generator, canvas: Image.Image) -> Image.Image:
    """Even, warm light with soft fall-off, blotches and a shadow under the shelf above, at a varied exposure."""
    width, height = canvas.size
    blotches = Image.fromarray(rng.normal(1.0, 0.04, (4, 4)).astype(np.float32), ).resize(
        (LIGHT_GRID[1], LIGHT_GRID[0]), Image.BILINEAR)
    ys = np.linspace(-1, 1, LIGHT_GRID[0])[:, None]
    xs = np.linspace(-1, 1, LIGHT_GRID[1])[None, :]
    shadow = rng.uniform(0.0, 0.45) * np.exp(-(ys + 1) / rng.uniform(0.1, 0.4))
    falloff = 1.0 - 0.08 * xs ** 2 - 0.05 * (ys - rng.uniform(-0.5, 0.5)) ** 2 - shadow
    warm = np.array([1.0, rng.uniform(0.96, 0.99), rng.uniform(0.92, 0.97)]) * rng.uniform(0.9, 1.05)
    light = (np.asarray(blotches) * falloff)[:, :, None] * warm
    light_image = Image.fromarray(np.clip(light / _LIGHT_MAX * 255, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR)
    return ImageChops.multiply(canvas, light_image).point(_LIGHT_LUT)
