"""The EMNIST bymerge class list: 47 characters, label index -> character."""

# Order of emnist-bymerge-mapping.txt: digits, upper case, then the 11 lower-case letters
# whose shapes differ from their capitals (https://arxiv.org/abs/1702.05373, table II).
BYMERGE_CLASSES: tuple[str, ...] = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt")

DIGITS = tuple("0123456789")
BYCLASS_CLASSES = DIGITS + tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# Label -> character for the tfds `emnist` configs (as in each config's official mapping file);
# `letters` is left to tfds's own names because its labels start at 1.
EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "bymerge": BYMERGE_CLASSES,
    "balanced": BYMERGE_CLASSES,
    "byclass": BYCLASS_CLASSES,
    "digits": DIGITS,
    "mnist": DIGITS,
}
