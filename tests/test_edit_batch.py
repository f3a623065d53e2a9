"""edit_batch, the per-scale hook and the stage caches: what a server relies on, bit for bit."""

import numpy as np
import pytest

from varedit_deploy.config import SamplingConfig
from varedit_deploy.errors import InputError
from varedit_deploy.runtime.pipeline import EditPipeline, EditRequest
from varedit_deploy.runtime.stage_cache import StageCache


@pytest.fixture(scope="module")
def pipe(tiny_artifact):
    return EditPipeline.from_artifacts(tiny_artifact)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.loop.bits, b.loop.bits, strict=True)) and np.array_equal(
        np.asarray(a.image), np.asarray(b.image))


def test_edit_batch_equals_separate_edits_and_isolates_failures(pipe, photos):
    base = pipe.config.sampling
    requests = [EditRequest(photos["coffee"], "make the cup red", SamplingConfig(cfg=2.0, tau=1.0, seed=3), record=True),
                EditRequest(photos["chelsea"], " ", base),  # empty instruction: fails alone
                EditRequest(photos["astronaut"], "add a hat", SamplingConfig(cfg=3.0, tau=0.7, seed=9), record=True)]
    results = pipe.edit_batch(requests)
    assert isinstance(results[1], InputError)
    for r, out in zip([requests[0], requests[2]], [results[0], results[2]]):
        assert _same(out, pipe.edit(r.image, r.instruction, r.sampling, record=True))


def test_scale_hook_sees_every_scale_and_can_stop_the_edit(pipe, photos):
    seen = []
    result = pipe.edit(photos["coffee"], "make it blue", seed=1, record=True,
                       on_scale=lambda s, summed: seen.append((s, pipe.backend.read(summed))))
    assert [s for s, _ in seen] == list(range(pipe.config.schedule.num_scales))
    assert np.array_equal(seen[-1][1], pipe.backend.read(result.loop.summed))

    class Stop(Exception):
        pass

    def stop_at_3(scale, summed):
        if scale == 3:
            raise Stop()
        seen.append(scale)

    seen.clear()
    with pytest.raises(Stop):
        pipe.edit(photos["coffee"], "make it blue", seed=1, on_scale=stop_at_3)
    assert seen == [0, 1, 2]
    assert _same(pipe.edit(photos["coffee"], "make it blue", seed=1, record=True), result)  # the next edit is unaffected


def test_caches_skip_the_encoders_and_change_nothing(tiny_artifact, pipe, photos):
    cached = EditPipeline.from_artifacts(tiny_artifact, text_cache_bytes=2**20, image_cache_bytes=2**20)
    first = cached.edit(photos["chelsea"], "make the cat blue", seed=4, record=True)
    again = cached.edit(photos["chelsea"], "make the cat blue", seed=4, record=True)
    other = cached.edit(photos["coffee"], "make the cat blue", seed=4, record=True)
    assert (cached.text_cache.hits, cached.text_cache.misses) == (2, 1)
    assert (cached.image_cache.hits, cached.image_cache.misses) == (1, 2)
    assert _same(first, again) and _same(first, pipe.edit(photos["chelsea"], "make the cat blue", seed=4, record=True))
    assert _same(other, pipe.edit(photos["coffee"], "make the cat blue", seed=4, record=True))


def test_stage_cache_is_bounded_and_least_recently_used_goes_first():
    cache = StageCache(max_bytes=3 * 400)
    for key in b"abc":
        cache.put(bytes([key]), np.zeros(100, np.float32))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", np.zeros(100, np.float32))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"d") is not None
    assert cache.bytes == 1200 and len(cache) == 3
    cache.put(b"huge", np.zeros(1000, np.float32))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(b"huge") is None and len(cache) == 3
    assert not StageCache(0).enabled
