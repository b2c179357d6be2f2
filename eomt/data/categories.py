"""Class metadata of the datasets whose annotation files do not carry it (ADE20K and Cityscapes)
and of weights that carry none.

COCO's categories come from its JSON files.
"""

import colorsys

# The 150 classes of the ADE20K scene-parsing benchmark (ADEChallengeData2016), in the order of
# its objectInfo150 table: pixel value v of an annotation PNG is ADE20K_150_NAMES[v - 1], 0 is
# unlabelled. Short names as in the Mask2Former/EoMT class lists.
ADE20K_150_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road, route", "bed", "window",
    "grass", "cabinet", "sidewalk, pavement", "person", "earth, ground", "door", "table",
    "mountain, mount", "plant", "curtain", "chair", "car", "water", "painting, picture", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock, stone", "wardrobe, closet, press", "lamp", "tub", "rail", "cushion",
    "base, pedestal, stand", "box", "column, pillar", "signboard, sign",
    "chest of drawers, chest, bureau, dresser", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator, icebox", "grandstand, covered stand", "path", "stairs", "runway",
    "case, display case, showcase, vitrine", "pool table, billiard table, snooker table",
    "pillow", "screen door, screen", "stairway, staircase", "river", "bridge, span", "bookcase",
    "blind, screen", "coffee table", "toilet, can, commode, crapper, pot, potty, stool, throne",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm, palm tree",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel, hut, hutch, shack, shanty", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning, sunshade, sunblind", "street lamp", "booth", "tv", "plane", "dirt track", "clothes",
    "pole", "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving staircase, moving stairway", "ottoman, pouf, pouffe, puff, hassock",
    "bottle", "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card",
    "stage", "van", "ship", "fountain",
    "conveyer belt, conveyor belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic washer, washing machine", "plaything, toy", "pool", "stool",
    "barrel, cask", "basket, handbasket", "falls", "tent", "bag", "minibike, motorbike",
    "cradle", "oven", "ball", "food, solid food", "step, stair", "tank, storage tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket, cover", "sculpture", "hood, exhaust hood", "sconce", "vase", "traffic light",
    "tray", "trash can", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass, drinking glass", "clock", "flag",
)  # fmt: skip

# Category k (1..100) of the ADE20K instance annotations (annotations_instance, R channel) is
# ADE20K class ADE20K_INSTANCE_TO_150[k - 1] (1..150): the table of the common panoptic
# conversion (Mask2Former's ade20k_instance_catid_mapping.txt). These 100 classes are things.
ADE20K_INSTANCE_TO_150 = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38, 39, 40, 42, 43,
    44, 45, 46, 48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68, 70, 71, 72, 73, 74, 75, 76,
    77, 79, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91, 93, 94, 96, 98, 99, 103, 104, 105, 108, 109,
    111, 112, 113, 116, 117, 119, 120, 121, 122, 124, 125, 126, 127, 128, 130, 131, 133, 134, 135,
    136, 137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
)  # fmt: skip
ADE20K_THING_IDS = frozenset(ADE20K_INSTANCE_TO_150)
COCO_PANOPTIC_THINGS = 80  # the first 80 of the 133 COCO panoptic classes are things


def distinct_color(index: int) -> list[int]:
    """A display colour for categories without one: hues spaced by the golden ratio."""
    hue = (index * 0.618033988749895) % 1.0
    return [round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, 0.75, 0.95)]


def generic_categories(num_classes: int, names: list[str] | None = None) -> list[dict]:
    """Class metadata for weights that carry none: given names or 'class N', and for the 133
    COCO panoptic classes the first 80 as things (stuff otherwise, things for 80 classes)."""
    things = {133: COCO_PANOPTIC_THINGS, 80: 80}.get(num_classes, 0)
    return [
        {
            "id": i,
            "name": names[i] if names else f"class {i}",
            "isthing": int(i < things),
            "color": distinct_color(i),
        }
        for i in range(num_classes)
    ]


def ade20k_categories(with_things: bool) -> list[dict]:
    """The 150 ADE20K classes, ids 1..150 (the annotation pixel values).

    with_things=False marks all of them stuff, as suits semantic targets (one mask per class).
    """
    return [
        {
            "id": index + 1,
            "name": name,
            "isthing": int(with_things and index + 1 in ADE20K_THING_IDS),
            "color": distinct_color(index),
        }
        for index, name in enumerate(ADE20K_150_NAMES)
    ]


def cityscapes_labels() -> list:
    """The Cityscapes label table (cityscapesscripts): imported only where Cityscapes is used,
    the package runs without it (the GPU machine has none)."""
    from cityscapesscripts.helpers.labels import labels

    return labels


def cityscapes_categories() -> list[dict]:
    """The 19 Cityscapes training classes in train-id order; id is the Cityscapes label id.

    All are marked stuff, as suits semantic targets (one mask per class).
    """
    train_labels = sorted(
        (label for label in cityscapes_labels() if 0 <= label.trainId < 255),
        key=lambda label: label.trainId,
    )
    return [
        {"id": label.id, "name": label.name, "isthing": 0, "color": list(label.color)}
        for label in train_labels
    ]


def cityscapes_label_lut() -> list[int]:
    """Train id (0..18, 255 = ignored) of each label id 0..255 of a gtFine labelIds PNG."""
    lut = [255] * 256
    for label in cityscapes_labels():
        if 0 <= label.id < 256 and 0 <= label.trainId < 255:
            lut[label.id] = label.trainId
    return lut


def cityscapes_category_classes() -> list[dict]:
    """The 8 categories of the Cityscapes label table (void, flat, construction, object,
    nature, sky, human, vehicle) in category-id order; void is a class here, as in the
    8-category comparisons (Cityscapes' own category score leaves it out). Each takes the
    colour of its first label."""
    first = {}
    for label in cityscapes_labels():
        if label.id >= 0:
            first.setdefault(label.categoryId, label)
    return [
        {"id": cat_id, "name": label.category, "isthing": 0, "color": list(label.color)}
        for cat_id, label in sorted(first.items())
    ]


def cityscapes_category_lut() -> list[int]:
    """Category id (0..7, 255 for values no label has) of each label id of a labelIds PNG."""
    lut = [255] * 256
    for label in cityscapes_labels():
        if 0 <= label.id < 256:
            lut[label.id] = label.categoryId
    return lut
