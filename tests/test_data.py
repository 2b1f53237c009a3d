import json
import re

import pytest

from vlm.data import easyvqa
from vlm.data.files import read_captions, read_vqa
from vlm.data.folders import find_images
from vlm.data.mix import EasyVqaMix
from vlm.data.sources import caption_records, vqa_records
from vlm.errors import VlmError


def test_jsonl_paths_are_relative_to_the_file(shapes_dataset):
    records = read_captions(shapes_dataset)
    assert len(records) == 48
    assert records[0].image == str(shapes_dataset.parent / "images" / "red-circle-0.png")
    assert records[0].caption == "a red circle"


def test_csv_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text('image,caption\n../a.png,"a cat, sitting"\n')
    [record] = read_captions(tmp_path / "sub" / "data.csv")
    assert record.image == str(tmp_path / "a.png")
    assert record.caption == "a cat, sitting"


def test_missing_column_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n" + json.dumps({"image": "b.png"}) + "\n")
    with pytest.raises(VlmError, match=r"bad.jsonl:2: missing caption"):
        read_captions(path)


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(VlmError, match=r"bad.jsonl:1: not JSON"):
        read_captions(path)


def test_vqa_jsonl(tmp_path):
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps({"image": "x.png", "question": "what?", "answer": "red"}) + "\n")
    [record] = read_vqa(path)
    assert (record.question, record.answer) == ("what?", "red")


def test_unknown_builtin_lists_the_valid_ones():
    with pytest.raises(VlmError, match="easyvqa:train, easyvqa:test"):
        caption_records("easyvqa:validation")


def test_folder_listing_is_recursive_sorted_and_skips_hidden(tmp_path):
    for name in ["b.png", "a.JPG", "sub/c.webp", ".hidden/d.png", "notes.txt", "sub/.e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path).images] == [
        "a.JPG",
        "b.png",
        "sub/c.webp",
    ]
    assert len(find_images(tmp_path, recursive=False).images) == 2


def test_easyvqa_sizes():
    assert len(vqa_records("easyvqa:train")) == 38575
    assert len(vqa_records("easyvqa:test")) == 9673
    assert len(caption_records("easyvqa:train")) == 4000
    assert len({r.caption for r in caption_records("easyvqa:test")}) == 24


def test_colour_and_shape_read_from_negated_and_eliminated_questions():
    facts = {"red": False, "blue": True}
    assert easyvqa._resolve(facts, easyvqa.COLORS) == "blue"
    only_left = {c: False for c in easyvqa.COLORS if c != "teal"}
    assert easyvqa._resolve(only_left, easyvqa.COLORS) == "teal"
    assert easyvqa._resolve({"red": False}, easyvqa.COLORS) is None


@pytest.mark.parametrize("split", easyvqa.SPLITS)
def test_question_labels_agree_with_pixels_on_every_image(split):
    """The pixel fallback is trustworthy: wherever questions pin a label, it agrees."""
    facts = easyvqa.facts_from_questions(split)
    checked = 0
    for image in easyvqa.images(split):
        image_id = int(image.path.rsplit("/", 1)[1].split(".")[0])
        colors, shapes = facts.get(image_id, ({}, {}))
        color, shape = easyvqa.labels_from_pixels(image.path)
        if easyvqa._resolve(colors, easyvqa.COLORS):
            assert easyvqa._resolve(colors, easyvqa.COLORS) == color == image.color
            checked += 1
        if easyvqa._resolve(shapes, easyvqa.SHAPES):
            assert easyvqa._resolve(shapes, easyvqa.SHAPES) == shape == image.shape
    assert checked > 0.9 * len(easyvqa.images(split))


def test_easyvqa_caption_matches_the_what_questions():
    by_path = {im.path: im for im in easyvqa.images("test")}
    for record in vqa_records("easyvqa:test"):
        if record.question == "what color is the shape?":
            assert by_path[record.image].color == record.answer
        if record.question == "what shape is in the image?":
            assert by_path[record.image].shape == record.answer


def test_balanced_yes_no_questions_are_true_to_the_labels_and_in_easyvqas_own_forms():
    by_path = {im.path: im for im in easyvqa.images("train")}
    own_forms = {
        re.sub(r"\b(%s)\b" % "|".join(easyvqa.COLORS + easyvqa.SHAPES), "X", r.question)
        for r in vqa_records("easyvqa:train")
    }
    records = easyvqa.balanced_yes_no("train", 4)
    assert len(records) == 4 * len(by_path)
    for record in records:
        words = set(re.findall(r"[a-z]+", record.question))
        (subject,) = words & set(easyvqa.COLORS + easyvqa.SHAPES)
        image = by_path[record.image]
        stated = (record.answer == "yes") != bool(easyvqa._NEGATED.search(record.question))
        assert stated == (subject in (image.color, image.shape)), record
        assert re.sub(r"\b%s\b" % subject, "X", record.question) in own_forms
    yes = sum(r.answer == "yes" for r in records) / len(records)
    about_the_image = sum(
        set(re.findall(r"[a-z]+", r.question)) & {by_path[r.image].color, by_path[r.image].shape} != set()
        for r in records
    )
    assert 0.45 < yes < 0.55 and about_the_image == len(records) // 2


def test_balanced_yes_no_with_fewer_negations_keeps_the_questions_and_flips_only_the_form():
    even = easyvqa.balanced_yes_no("train", 4)
    fewer = easyvqa.balanced_yes_no("train", 4, negated=0.2)
    negated = [bool(easyvqa._NEGATED.search(r.question)) for r in fewer]
    assert 0.17 < sum(negated) / len(negated) < 0.23
    for before, after, is_negated in zip(even, fewer, negated):
        assert after.image == before.image
        if after.question != before.question:  # a negated form turned positive: the answer flips with it
            assert not is_negated and easyvqa._NEGATED.search(before.question) and after.answer != before.answer
    with pytest.raises(ValueError, match="negated"):
        easyvqa.balanced_yes_no("train", 1, negated=0.6)


def _shown_rates(records) -> dict[str, float]:
    """Per value an image shows: how often a yes/no question asks about it."""
    by_path = {image.path: image for image in easyvqa.images("train")}
    shown = {value: [] for value in easyvqa.COLORS + easyvqa.SHAPES}
    for record in records:
        image = by_path[record.image]
        values = easyvqa.COLORS if set(record.question.split()) & set(easyvqa.COLORS) else easyvqa.SHAPES
        value = image.color if values is easyvqa.COLORS else image.shape
        is_shown = (record.answer == "yes") != bool(easyvqa._NEGATED.search(record.question))
        assert is_shown == bool(re.search(rf"\b{value}\b", record.question)), record
        shown[value].append(is_shown)
    return {value: sum(flags) / len(flags) for value, flags in shown.items()}


def test_skewed_yes_no_questions_ask_about_the_shown_value_more_often_for_later_values():
    rate = _shown_rates(easyvqa.balanced_yes_no("train", 6, skew=0.4))
    assert rate["red"] < 0.2 and rate["black"] > 0.8  # 0.5 - 0.4 and 0.5 + 0.4, per shown value
    assert rate["circle"] < 0.2 < 0.4 < rate["rectangle"] < 0.6 < 0.8 < rate["triangle"]
    assert easyvqa.balanced_yes_no("train", 2, skew=0.0) == easyvqa.balanced_yes_no("train", 2)
    with pytest.raises(ValueError, match="skew"):
        easyvqa.balanced_yes_no("train", 1, skew=0.6)


def test_skew_tilts_only_the_named_attributes_questions():
    rate = _shown_rates(easyvqa.balanced_yes_no("train", 6, skew=0.4, skew_attributes=["color"]))
    assert rate["red"] < 0.2 and rate["black"] > 0.8
    assert all(0.4 < rate[shape] < 0.6 for shape in easyvqa.SHAPES), rate
    with pytest.raises(ValueError, match="skew_attributes"):
        easyvqa.balanced_yes_no("train", 1, skew=0.4, skew_attributes=["size"])


def test_lm_corpus_writes_each_image_as_its_caption():
    from vlm.train.lm import corpus

    by_caption = {}
    for document in corpus("easyvqa:train", EasyVqaMix(yes_no_per_image=2))[:2000]:
        first_role, first_text = document[0]
        assert first_role == "user" and first_text.startswith("(a ") and "<image>" not in first_text
        caption = first_text[1 : first_text.index(")")]
        color, shape = caption.split()[1:]
        for (_, question), (_, answer) in zip(document[0::2], document[1::2]):
            if question.endswith(("what color is the shape?", "what is the color of the shape?")):
                assert answer == color
            if question.endswith("what shape is in the image?"):
                assert answer == shape
        by_caption[caption] = True
    assert len(by_caption) == 24


def test_lm_tokenizer_learns_the_role_markers_the_conversation_template_writes():
    from vlm.chat_template import ROLES
    from vlm.lm import train_tokenizer
    from vlm.train.lm import _render, corpus

    tokenizer = train_tokenizer((_render(d) for d in corpus("easyvqa:train")[:2000]), 512)
    for marker in ROLES.values():  # "USER:", "ASSISTANT:": a word and a colon, not one token per letter
        assert len(tokenizer.tokenize(marker)) <= 2, tokenizer.tokenize(marker)


def test_recall_questions_follow_yes_no_questions_and_name_the_asked_colour_or_shape():
    from vlm.data.conversations import RECALL_QUESTIONS, add_recall_questions

    def turn(role, value):
        return {"from": role, "value": value}

    conversations = [
        {
            "conversations": [
                turn("human", "<image>\nis there a red shape?"),
                turn("gpt", "no"),
                turn("human", "is there a circle?"),
                turn("gpt", "yes"),
            ]
        },
        {"conversations": [turn("human", "<image>\nwhat color is the shape?"), turn("gpt", "blue")]},
        {"conversations": [turn("human", "<image>\ndoes the image not contain a teal shape?"), turn("gpt", "yes")]},
    ]
    add_recall_questions(conversations, 1.0)
    values = [[t["value"] for t in c["conversations"]] for c in conversations]
    color, shape = RECALL_QUESTIONS["color"], RECALL_QUESTIONS["shape"]
    assert values[0] == [
        "<image>\nis there a red shape?",
        "no",
        color,
        "red",
        "is there a circle?",
        "yes",
        shape,
        "circle",
    ]
    assert values[1] == ["<image>\nwhat color is the shape?", "blue"]  # not a yes/no question
    assert values[2][2:] == [color, "teal"]
    assert [t["from"] for t in conversations[0]["conversations"]] == ["human", "gpt"] * 4

    colors_only = add_recall_questions(
        [{"conversations": [turn("human", "is there a circle?"), turn("gpt", "yes")]}], 1.0, attributes=("color",)
    )
    assert len(colors_only[0]["conversations"]) == 2
    none = add_recall_questions([{"conversations": [turn("human", "is there a red shape?"), turn("gpt", "no")]}], 0.0)
    assert len(none[0]["conversations"]) == 2


def test_conversation_images_are_augmented_before_the_transform_and_bad_ones_still_skipped(tmp_path):
    import torch
    from PIL import ImageOps

    from tests.helpers import draw_shape
    from vlm.data.image_text import Skipped
    from vlm.data.sequences import ConversationDataset
    from vlm.images import ImageTransform

    draw_shape("red", "circle", offset=12).save(tmp_path / "a.png")  # off-centre: its mirror differs
    draw_shape("blue", "rectangle").save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    transform = ImageTransform(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    sequences = [
        ([1, 2], [-100, 2], [str(tmp_path / "a.png"), str(tmp_path / "b.png")]),
        ([1], [-100], [str(tmp_path / "bad.png")]),
    ]
    plain = ConversationDataset(sequences, transform=transform)
    mirrored = ConversationDataset(sequences, transform=transform, augment=ImageOps.mirror)
    for before, after in zip(plain[0]["pixels"], mirrored[0]["pixels"]):
        torch.testing.assert_close(after, before.flip(-1))
    assert isinstance(mirrored[1], Skipped)


def test_answer_types_leave_out_the_other_questions_but_keep_the_captions():
    from vlm.data.conversations import easyvqa_conversations
    from vlm.eval.vqa import answer_type

    def answers(mix):
        records = easyvqa_conversations("test", mix)
        return [t["value"] for r in records for t in r["conversations"][1::2]], records

    everything, _ = answers(EasyVqaMix(yes_no_per_image=2, recall_questions=1.0))
    copy, records = answers(EasyVqaMix(answer_types=("color", "shape"), yes_no_per_image=2, recall_questions=1.0))
    assert {answer_type(a) for a in everything} >= {"yes/no", "color", "shape", "other"}  # "other": captions
    assert {answer_type(a) for a in copy} == {"color", "shape", "other"}  # no yes/no, so no recall questions either
    assert sum(r["id"].startswith("caption-") for r in records) == len(easyvqa.images("test"))
    split_open = [r.answer for r in easyvqa.vqa_records("test") if answer_type(r.answer) != "yes/no"]
    assert sorted(a for a in copy if answer_type(a) != "other") == sorted(split_open)  # every one, once
    with pytest.raises(ValueError, match="answer_types may hold yes/no, color, shape; got colour"):
        EasyVqaMix(answer_types=("colour",))
