import pytest
from safetensors.torch import load_file

from cli_helpers import pairs_config
from dmdctl.commands.make_pairs import make_pairs
from dmdctl.data.pairs import load_pairs
from dmdctl.errors import UserError


def test_corrupt_shard_is_named(toy_teacher, tmp_path):
    make_pairs(pairs_config(toy_teacher, tmp_path, num_pairs=40))
    shard = tmp_path / "pairs-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="pairs-00001.safetensors is corrupt or truncated"):
        load_pairs(tmp_path)


def test_a_flipped_byte_of_the_same_length_is_named(toy_teacher, tmp_path):
    """Truncation safetensors rejects by itself; one flipped bit in the tensor data it would
    read without complaint, as a slightly wrong target. The manifest's sha256 catches it."""
    make_pairs(pairs_config(toy_teacher, tmp_path, num_pairs=40))
    shard = tmp_path / "pairs-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's bytes: the file still parses
    shard.write_bytes(bytes(data))
    assert "target" in load_file(str(shard))  # safetensors alone does not notice
    with pytest.raises(UserError, match="pairs-00000.safetensors is corrupt or truncated"):
        load_pairs(tmp_path)
