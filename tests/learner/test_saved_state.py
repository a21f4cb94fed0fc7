"""Checkpoints, specs and replay files that are corrupt, torn or made for other spaces are named, with the way on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from learner.checkpoints import Checkpoints
from learner.replay import ReplayBuffer
from protocol.exits import FatalError, fatal_message

pytestmark = pytest.mark.timeout(60)


def test_checkpoints_keep_the_previous_one_and_name_a_corrupt_one(tmp_path):
    ck = Checkpoints(tmp_path / "run" / "checkpoints")
    ck.save("latest", {"updates": 1}, 1, {"total": 0})
    ck.save("latest", {"updates": 2}, 2, {"total": 0})
    assert ck.load()["agent"] == {"updates": 2}
    assert ck.load("previous")["agent"] == {"updates": 1}
    latest = ck.dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # a copy cut short
    with pytest.raises(FatalError) as exc:
        ck.load()
    text = str(exc.value)
    assert str(latest) in text and "corrupt" in text and "--resume-from previous" in text and "new run" in text
    assert fatal_message(exc.value) == text


def test_a_corrupt_spec_is_named(tmp_path):
    ck = Checkpoints(tmp_path / "checkpoints")
    (ck.dir / "spec.json").write_text("{\"frame_shape\": [3")
    with pytest.raises(FatalError, match="spec.json is corrupt"):
        ck.load_spec()


def make_replay(directory, **kw):
    return ReplayBuffer(directory, 100, (3,), np.float32, 1, **kw)


def fill(replay, n):
    frames = np.ones((n, 3), np.float32)
    replay.add_batch("w/0", 0, np.r_[1, np.zeros(n - 1)].astype(np.uint8), frames, np.zeros((n, 1), np.float32),
                     np.zeros(n, np.float32), np.zeros(n, np.uint8), np.zeros(n, np.uint8))


def test_a_corrupt_replay_index_is_named_and_the_checkpoints_copy_restores_it(tmp_path):
    replay = make_replay(tmp_path / "replay")
    fill(replay, 10)
    replay.flush()
    saved = replay.index()
    (tmp_path / "replay" / "index.json").write_text("{\"total\": ")
    with pytest.raises(FatalError) as exc:
        make_replay(tmp_path / "replay")
    assert "index.json is corrupt" in str(exc.value) and "move it away" in str(exc.value)
    (tmp_path / "replay" / "index.json").unlink()  # the operator follows the advice
    restored = make_replay(tmp_path / "replay", fallback_index=saved)
    assert restored.total == 10 and restored.transitions_total == saved["transitions_total"]


def test_a_replay_index_of_the_wrong_shape_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    (tmp_path / "replay" / "index.json").write_text(json.dumps({"total": "many", "streams": {}}))
    with pytest.raises(FatalError, match="index.json is corrupt"):
        make_replay(tmp_path / "replay")


def test_a_torn_replay_array_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    (tmp_path / "replay" / "rewards.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(FatalError, match="rewards.npy is corrupt"):
        make_replay(tmp_path / "replay")


def test_a_replay_made_for_other_spaces_or_missing_an_array_is_named(tmp_path):
    make_replay(tmp_path / "replay").flush()
    with pytest.raises(FatalError, match="was made for"):
        ReplayBuffer(tmp_path / "replay", 100, (4,), np.float32, 1)
    (tmp_path / "replay" / "prev.npy").unlink()
    with pytest.raises(FatalError, match="prev.npy is missing"):
        make_replay(tmp_path / "replay")
