import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from apps.caption import caption_folder
from tests.helpers import GOOD_IMAGES, HAZARDS, draw_shape, fail_if_blocked, make_hazard_folder
from vlm.cli import main
from vlm.errors import VlmError


def _huge_header_png(path):
    """A valid-looking PNG whose header claims 100000 x 100000 pixels."""

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (100000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def messy_folder(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")]):
        draw_shape(color, shape).save(folder / f"good{i}.png")
    jpeg = folder / "cut.jpg"
    draw_shape("red", "rectangle").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is text, not a picture")
    _huge_header_png(folder / "huge.png")
    return folder


def test_bad_files_are_reported_and_the_rest_captioned(tiny_llava, messy_folder, tmp_path):
    out = tmp_path / "captions.jsonl"
    report = caption_folder(messy_folder, model=tiny_llava, out=out, batch_size=2, max_new_tokens=4, progress=False)
    assert report.captioned == 3
    assert sorted(reason.split(":")[0].rsplit("/", 1)[-1] for reason in report.failed) == [
        "cut.jpg",
        "empty.png",
        "huge.png",
        "notes.png",
    ]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == ["pictures/good0.png", "pictures/good1.png", "pictures/good2.png"]
    assert "4 failed" in report.summary()


def test_a_second_run_skips_what_is_done(tiny_llava, messy_folder, tmp_path):
    out = tmp_path / "captions.csv"
    caption_folder(messy_folder, model=tiny_llava, out=out, fmt="csv", max_new_tokens=4, progress=False)
    draw_shape("blue", "circle").save(messy_folder / "later.png")
    report = caption_folder(messy_folder, model=tiny_llava, out=out, fmt="csv", max_new_tokens=4, progress=False)
    assert (report.captioned, report.already_done) == (1, 3)
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == 4
    again = caption_folder(
        messy_folder, model=tiny_llava, out=out, fmt="csv", overwrite=True, max_new_tokens=4, progress=False
    )
    assert again.captioned == 4


def test_txt_format_writes_beside_each_image(tiny_llava, tmp_path):
    (tmp_path / "sub").mkdir()
    draw_shape("red", "circle").save(tmp_path / "a.png")
    draw_shape("blue", "circle").save(tmp_path / "sub" / "b.png")
    report = caption_folder(
        tmp_path, model=tiny_llava, out=None, fmt="txt", recursive=True, max_new_tokens=4, progress=False
    )
    assert report.captioned == 2
    assert (tmp_path / "a.txt").is_file() and (tmp_path / "sub" / "b.txt").is_file()


def test_batched_captions_equal_one_at_a_time(tiny_llava, messy_folder, tmp_path):
    one = caption_folder(
        messy_folder, model=tiny_llava, out=tmp_path / "1.jsonl", batch_size=1, max_new_tokens=6, progress=False
    )
    many = caption_folder(
        messy_folder, model=tiny_llava, out=tmp_path / "8.jsonl", batch_size=8, max_new_tokens=6, progress=False
    )
    assert one.captioned == many.captioned
    assert (tmp_path / "1.jsonl").read_text() == (tmp_path / "8.jsonl").read_text()


def test_empty_folder_is_an_error(tiny_llava, tmp_path):
    with pytest.raises(VlmError, match="no images"):
        caption_folder(tmp_path, model=tiny_llava, out=tmp_path / "x.jsonl", progress=False)


def test_killed_run_resumed_captions_every_image_exactly_once(tiny_llava_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        draw_shape(["red", "blue", "green"][i % 3], "circle", offset=i % 8).save(folder / f"{i:03d}.png")
    out = tmp_path / "captions.jsonl"
    command = [
        sys.executable,
        "-m",
        "vlm.cli",
        "caption",
        str(folder),
        "--model",
        str(tiny_llava_dir),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "24",
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = len(out.read_bytes().splitlines())
    assert 3 <= first < 40, "the run should have been killed part-way"
    with out.open("ab") as f:
        f.write(b'{"image": "many/0')  # as if the kill landed mid-row
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(images) == sorted(f"many/{i:03d}.png" for i in range(40))


def test_output_mistakes_are_refused_before_any_work(tiny_llava, messy_folder, tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(VlmError, match="is a folder"):
        caption_folder(messy_folder, model=tiny_llava, out=tmp_path / "dir.jsonl", progress=False)
    with pytest.raises(VlmError, match="--format csv writes a .csv file"):
        caption_folder(messy_folder, model=tiny_llava, out=tmp_path / "x.jsonl", fmt="csv", progress=False)
    (tmp_path / "other.csv").write_text("file,text\na.png,hello\n")
    with pytest.raises(VlmError, match="other.csv:2: missing image"):
        caption_folder(messy_folder, model=tiny_llava, out=tmp_path / "other.csv", fmt="csv", progress=False)
    draw_shape("red", "circle").save(messy_folder / "good0.jpg")
    with pytest.raises(VlmError, match="would both write"):
        caption_folder(messy_folder, model=tiny_llava, out=None, fmt="txt", progress=False)
    assert not list(messy_folder.glob("*.txt"))


def test_symlinked_images_are_captioned_once_across_runs(tiny_llava, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    draw_shape("red", "circle").save(tmp_path / "elsewhere.png")
    (folder / "link.png").symlink_to(tmp_path / "elsewhere.png")
    out = tmp_path / "captions.jsonl"
    assert caption_folder(folder, model=tiny_llava, out=out, max_new_tokens=4, progress=False).captioned == 1
    again = caption_folder(folder, model=tiny_llava, out=out, max_new_tokens=4, progress=False)
    assert (again.captioned, again.already_done) == (0, 1)
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == ["pictures/link.png"]


def test_fifo_links_and_latin1_names_are_reported_and_every_good_image_captioned(tiny_llava, tmp_path):
    folder = make_hazard_folder(tmp_path / "hazards")
    out = tmp_path / "captions.jsonl"
    with fail_if_blocked(60):
        report = caption_folder(folder, model=tiny_llava, out=out, batch_size=2, max_new_tokens=4, progress=False)
    assert report.captioned == 3
    named = sorted(reason.split(":")[0].rsplit("/", 1)[-1] for reason in report.failed)
    assert named == sorted(HAZARDS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == [f"hazards/{name}" for name in GOOD_IMAGES]


def test_hazard_folder_through_the_cli_exits_0_and_names_each_bad_entry(tiny_llava_dir, tmp_path, capsys):
    folder = make_hazard_folder(tmp_path / "hazards")
    out = tmp_path / "captions.jsonl"
    argv = [
        "caption",
        str(folder),
        "--model",
        tiny_llava_dir,
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
    ]
    with fail_if_blocked(60):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 captioned, 0 already done, 4 failed" in printed
    for name in HAZARDS:
        assert name in printed


def test_txt_format_skips_hazards_and_writes_only_beside_good_images(tiny_llava, tmp_path):
    folder = make_hazard_folder(tmp_path / "hazards")
    with fail_if_blocked(60):
        report = caption_folder(folder, model=tiny_llava, out=None, fmt="txt", max_new_tokens=4, progress=False)
    assert (report.captioned, len(report.failed)) == (3, 4)
    assert sorted(p.name for p in folder.glob("*.txt")) == [name.replace(".png", ".txt") for name in GOOD_IMAGES]


def test_a_folder_of_only_unreadable_entries_reports_them_instead_of_no_images(tiny_llava, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    with fail_if_blocked(60):
        report = caption_folder(folder, model=tiny_llava, out=tmp_path / "c.jsonl", progress=False)
    assert report.captioned == 0 and len(report.failed) == 1 and "fifo.png" in report.failed[0]


@pytest.mark.parametrize(
    "option", [{"batch_size": 0}, {"batch_size": -3}, {"max_new_tokens": 0}, {"max_new_tokens": -1}]
)
def test_counts_below_one_are_refused_before_any_work(tiny_llava, messy_folder, tmp_path, option):
    out = tmp_path / "captions.jsonl"
    name = next(iter(option))
    with pytest.raises(VlmError, match=f"{name} must be at least 1") as raised:
        caption_folder(messy_folder, model=tiny_llava, out=out, progress=False, **option)
    assert "\n" not in str(raised.value)
    assert not out.exists()


def test_max_new_tokens_beyond_the_model_context_is_one_clear_error(tiny_llava, messy_folder, tmp_path):
    with pytest.raises(VlmError, match="128-token context"):
        caption_folder(messy_folder, model=tiny_llava, out=tmp_path / "c.jsonl", max_new_tokens=1000, progress=False)


class _GatedModel:
    """Delegates to a model, but its first answer_batch waits until the test opens the gate."""

    def __init__(self, model):
        self.model, self.entered, self.gate = model, threading.Event(), threading.Event()
        self.max_length = model.max_length

    def answer_batch(self, *args, **kwargs):
        self.entered.set()
        assert self.gate.wait(60)
        return self.model.answer_batch(*args, **kwargs)


@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_a_second_run_on_the_same_output_fails_at_once_while_the_first_writes(tiny_llava, messy_folder, tmp_path, fmt):
    out = tmp_path / "captions.jsonl" if fmt == "jsonl" else None
    gated = _GatedModel(tiny_llava)
    first = threading.Thread(
        target=lambda: caption_folder(messy_folder, model=gated, out=out, fmt=fmt, max_new_tokens=4, progress=False)
    )
    first.start()
    try:
        assert gated.entered.wait(60)
        started = time.time()
        with pytest.raises(VlmError, match="another run is writing it") as raised:
            caption_folder(messy_folder, model=tiny_llava, out=out, fmt=fmt, max_new_tokens=4, progress=False)
        assert time.time() - started < 5
        assert "\n" not in str(raised.value)
        assert str(out or messy_folder) in str(raised.value)
    finally:
        gated.gate.set()
        first.join(60)
    if out:
        images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
        assert sorted(images) == ["pictures/good0.png", "pictures/good1.png", "pictures/good2.png"]
    again = caption_folder(messy_folder, model=tiny_llava, out=out, fmt=fmt, max_new_tokens=4, progress=False)
    assert (again.captioned, again.already_done) == (0, 3)  # the lock went with the first run
