"""Shards are published (fsync, rename) off the writer's thread: in place once `wait` returns,
and a failure is not lost."""

import pytest

from pipelines.files import Publisher, atomic_stream


def test_published_files_are_in_place_after_wait_and_nothing_temporary_is_left(tmp_path):
    publisher = Publisher()
    for i in range(5):
        with atomic_stream(str(tmp_path / f"shard-{i}.tar"), publisher=publisher) as f:
            f.write(bytes([i]) * 100_000)
    publisher.wait()
    publisher.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-{i}.tar" for i in range(5)]
    assert all((tmp_path / f"shard-{i}.tar").read_bytes() == bytes([i]) * 100_000 for i in range(5))


def test_a_failed_publish_is_raised_by_wait_and_leaves_no_complete_looking_file(tmp_path):
    (tmp_path / "shard.tar").mkdir()  # renaming a file over a directory fails
    publisher = Publisher()
    with atomic_stream(str(tmp_path / "shard.tar"), publisher=publisher) as f:
        f.write(b"x" * 1000)
    with pytest.raises(OSError):
        publisher.wait()
    publisher.close()
    assert (tmp_path / "shard.tar").is_dir()  # untouched; the data stays under its temporary name
    assert [p.name.split(".tmp-")[0] for p in tmp_path.glob("*.tmp-*")] == ["shard.tar"]


def test_a_block_that_raises_publishes_nothing(tmp_path):
    publisher = Publisher()
    with pytest.raises(RuntimeError), atomic_stream(str(tmp_path / "shard.tar"), publisher=publisher) as f:
        f.write(b"partial")
        raise RuntimeError("the writer failed half-way")
    publisher.wait()
    publisher.close()
    assert list(tmp_path.iterdir()) == []
