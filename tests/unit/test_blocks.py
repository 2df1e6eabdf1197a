"""Block split / hash / diff with fixed vectors."""

import pytest

from daemon import blocks
from daemon.blocks import HASH_LEN, block_count, block_hash, file_root, is_zero, split

# XXH3-128 of the empty input is the reference vector published with xxHash.
EMPTY_XXH3_128 = "99aa06d3014798d86001c324468d497f"
A100_XXH3_128 = "7d09cdccbc6bead248fb02115fe96a8a"
ZERO16K_XXH3_128 = "a21d459c03bf6c99b7ce04b81707a4d0"
BS = 16384


def test_reference_vectors():
    assert block_hash(b"").hex() == EMPTY_XXH3_128
    assert block_hash(b"a" * 100).hex() == A100_XXH3_128
    assert block_hash(bytes(BS)).hex() == ZERO16K_XXH3_128


@pytest.mark.parametrize(
    "size,expected_lengths",
    [
        (0, []),  # empty file: no blocks
        (1, [1]),
        (BS - 1, [BS - 1]),  # one short block
        (BS, [BS]),  # exact multiple
        (3 * BS, [BS, BS, BS]),
        (2 * BS + 5, [BS, BS, 5]),  # short last block
    ],
)
def test_split_lengths_and_offsets(size, expected_lengths):
    data = bytes((i * 7 + 3) % 251 for i in range(size))
    got = list(split(data, BS))
    assert [b.length for b, _ in got] == expected_lengths
    assert [b.offset for b, _ in got] == [i * BS for i in range(len(expected_lengths))]
    assert [b.index for b, _ in got] == list(range(len(expected_lengths)))
    assert block_count(size, BS) == len(expected_lengths)
    for b, payload in got:
        assert bytes(payload) == data[b.offset : b.offset + b.length]
        assert b.hash == block_hash(payload) and len(b.hash) == HASH_LEN


def test_zero_detection():
    data = bytes(BS) + b"\x00" * (BS - 1) + b"\x01" + bytes(10)
    got = [b.zero for b, _ in split(data, BS)]
    assert got == [True, False, True]
    assert is_zero(b"") and is_zero(bytes(5)) and not is_zero(b"\x00\x00\x01")
    assert blocks.zero_hash(BS).hex() == ZERO16K_XXH3_128


def test_diff_against_known_hashes():
    old = bytes(range(256)) * 200  # 51200 bytes → 4 blocks (last short)
    new = bytearray(old)
    new[BS + 10] ^= 0xFF  # change block 1 only
    known = b"".join(b.hash for b, _ in split(old, BS))
    changed = [b.index for b, _ in split(bytes(new), BS) if blocks.changed(b, known)]
    assert changed == [1]
    # no known hashes: everything is new
    assert [b.index for b, _ in split(bytes(new), BS) if blocks.changed(b, None)] == [0, 1, 2, 3]
    # a file that grew: the extra block has no known hash
    grown = old + b"x" * BS
    assert [b.index for b, _ in split(grown, BS) if blocks.changed(b, known)] == [3, 4]


def test_truncate_hashes_drops_cut_block():
    hashes = b"".join(bytes([i]) * HASH_LEN for i in range(4))
    assert blocks.truncate_hashes(hashes, 2 * BS, BS) == hashes[: 2 * HASH_LEN]
    assert blocks.truncate_hashes(hashes, 2 * BS + 1, BS) == hashes[: 2 * HASH_LEN]
    assert blocks.truncate_hashes(hashes, 0, BS) == b""


def test_file_root_depends_on_size_and_hashes():
    h = block_hash(b"x")
    assert file_root(h, 1) != file_root(h, 2)
    assert file_root(h, 1) != file_root(h + h, 1)
    assert file_root(b"", 0) == file_root(b"", 0)
    assert len(file_root(b"", 0)) == HASH_LEN
