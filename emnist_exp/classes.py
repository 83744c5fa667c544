"""The EMNIST bymerge class list: 47 characters, label index -> character."""

# Order of emnist-bymerge-mapping.txt: digits, upper case, then the 11 lower-case letters
# whose shapes differ from their capitals (https://arxiv.org/abs/1702.05373, table II).
BYMERGE_CLASSES: tuple[str, ...] = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt")
