"""The generation scheduler: concurrent requests run as one batch and get exactly the answers
they get alone (greedy and sampled), streams, stop strings, cancellation, errors and shutdown."""

import threading

import pytest
from PIL import Image

from vlm.generation import GenerationConfig
from vlm.scheduler import GenerationScheduler, _held_back

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 180, 30), (240, 200, 20)]


def picture(i: int) -> Image.Image:
    return Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)])


def requests(n: int):
    """n different one-image (every third: text-only) conversations (the tiny model's context holds one image)."""
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(([("user", f"say something {i}")], []))
        else:
            out.append(([("user", f"<image>\nwhat color is it? {i}")], [picture(i)]))
    return out


def alone(model, turns, images, config) -> str:
    return model.chat([{"role": r, "content": t} for r, t in turns], images, **vars(config))


@pytest.mark.parametrize("kind, temperature", [("llava", 0.0), ("llava", 0.9), ("flamingo", 0.0)])
def test_concurrent_requests_are_batched_and_answer_as_alone(request, kind, temperature):
    model = request.getfixturevalue(f"tiny_{kind}")
    scheduler = GenerationScheduler(model, max_batch=8, max_wait_ms=200)
    cases = requests(8)
    configs = [GenerationConfig(max_new_tokens=4 + i % 3, temperature=temperature, seed=i) for i in range(8)]
    results = [None] * 8

    def ask(i):
        results[i] = scheduler.submit(*cases[i], configs[i]).text()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scheduler.close()
    assert max(scheduler.batches) > 1  # really batched
    expected = [alone(model, *cases[i], configs[i]) for i in range(8)]
    assert results == expected
    assert len(set(results)) > 1


def test_stream_counts_tokens_and_reports_why_it_ended(tiny_llava):
    scheduler = GenerationScheduler(tiny_llava)
    stream = scheduler.submit(*requests(1)[0], GenerationConfig(max_new_tokens=3))
    pieces = list(stream)
    scheduler.close()
    assert "".join(pieces).strip() == alone(tiny_llava, *requests(1)[0], GenerationConfig(max_new_tokens=3))
    assert stream.finish_reason in ("stop", "length") and 1 <= stream.completion_tokens <= 3
    assert stream.prompt_tokens == len(tiny_llava.encode(requests(1)[0][0], generation_prompt=True)[0])


def test_a_stop_string_ends_the_answer_before_it(tiny_llava):
    scheduler = GenerationScheduler(tiny_llava)
    turns, images = requests(1)[0]
    full = scheduler.submit(turns, images, GenerationConfig(max_new_tokens=8)).text()
    assert len(full) > 2
    stop = full[2:4]
    stream = scheduler.submit(turns, images, GenerationConfig(max_new_tokens=8), stop=(stop,))
    assert "".join(stream) == full[: full.index(stop)].lstrip()
    assert stream.finish_reason == "stop"
    scheduler.close()


def test_held_back_text_is_what_may_start_a_stop_string():
    assert _held_back("red cir", ("circle",)) == 3
    assert _held_back("red", ("\n\n",)) == 0
    assert _held_back("red\n", ("\n\n",)) == 1


def test_a_cancelled_stream_ends_and_the_others_finish(tiny_llava):
    scheduler = GenerationScheduler(tiny_llava, max_batch=4, max_wait_ms=200)
    cases = requests(2)
    gone = scheduler.submit(*cases[0], GenerationConfig(max_new_tokens=30))
    gone.cancel()
    kept = scheduler.submit(*cases[1], GenerationConfig(max_new_tokens=3))
    assert kept.text() == alone(tiny_llava, *cases[1], GenerationConfig(max_new_tokens=3))
    assert list(gone) == [] or gone.finish_reason == "cancelled"
    assert gone.finish_reason == "cancelled" and gone.completion_tokens == 0
    scheduler.close()


def test_bad_requests_fail_at_submit_and_a_failing_batch_reaches_its_callers(tiny_llava, monkeypatch):
    scheduler = GenerationScheduler(tiny_llava)
    with pytest.raises(ValueError, match="placeholders"):
        scheduler.submit([("user", "<image>\nwhat?")], [], GenerationConfig())
    monkeypatch.setattr(tiny_llava, "prepare", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        scheduler.submit(*requests(1)[0], GenerationConfig()).text()
    monkeypatch.undo()
    assert scheduler.submit(*requests(1)[0], GenerationConfig(max_new_tokens=2)).text() is not None  # still serving
    scheduler.close()


def test_close_finishes_queued_requests_and_refuses_new_ones(tiny_llava):
    scheduler = GenerationScheduler(tiny_llava, max_batch=1)
    streams = [scheduler.submit(*case, GenerationConfig(max_new_tokens=2)) for case in requests(3)]
    scheduler.close()
    assert all(s.finish_reason in ("stop", "length") for s in streams)
    with pytest.raises(RuntimeError, match="shutting down"):
        scheduler.submit(*requests(1)[0], GenerationConfig())
