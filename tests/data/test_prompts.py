import json

import pytest

import pipeline  # noqa: F401  (stub `outdated` before wilds)
from pipeline.data.datasets import DATASETS, PROMPTS_DIR, Prompts, load_prompts, read_prompts

SHIPPED = {"iwildcam": 182, "fmow": 62, "camelyon17": 2, "rxrx1": 1139, "waterbirds": 2}


@pytest.mark.parametrize("name,count", sorted(SHIPPED.items()))
def test_shipped_prompt_file_loads_with_dataset_class_count(name, count):
    prompts = load_prompts(name, n_classes=count)
    assert len(prompts.classnames) == count
    assert all("{c}" in t for t in prompts.templates)
    texts = prompts.texts()
    assert len(texts) == count and all(len(per_class) == len(prompts.templates) for per_class in texts)
    assert all("{c}" not in text for per_class in texts for text in per_class)
    # No two classes may share a prompt once the tokenizer lower-cases it.
    flat = [text.lower() for per_class in texts for text in per_class]
    assert len(set(flat)) == len(flat)


def test_every_table_entry_has_a_prompt_file_or_writes_its_own():
    for spec in DATASETS.values():
        if spec.name == "custom":  # written with the data from prepare.custom.templates
            assert spec.prompt_file == "" and spec.generated
        else:
            assert spec.prompt_path.is_file(), spec.name


def test_fmow_names_are_wilds_categories_in_label_order():
    from wilds.datasets.fmow_dataset import categories

    assert list(load_prompts("fmow").classnames) == [c.replace("_", " ") for c in categories]


def test_iwildcam_names_start_and_end_as_the_category_list():
    names = load_prompts("iwildcam").classnames
    assert names[0] == "empty"
    assert names[1] == "White-lipped peccary"
    assert names[172] == "motorcycle"
    assert names[181] == "mazama temama"  # repeats class 153's English name, so scientific


def test_synthetic_prompt_file_has_its_retention_tasks():
    spec = DATASETS["synthetic"]
    if not (PROMPTS_DIR / spec.prompt_file).is_file():
        pytest.skip("synthetic.json not written yet")
    assert load_prompts("synthetic").classnames
    for task in spec.retention_tasks:
        assert load_prompts(task.dataset, task=task.prompts or task.label).classnames


def test_texts_fill_the_placeholder_only():
    prompts = Prompts(("cat", "dog"), ("a {c} {with braces}.", "{c}"))
    assert prompts.texts() == [["a cat {with braces}.", "cat"], ["a dog {with braces}.", "dog"]]


def _write(tmp_path, obj, name="bad_prompts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_missing_placeholder_names_file_and_template(tmp_path):
    path = _write(tmp_path, {"classnames": ["cat", "dog"], "templates": ["a photo of a {c}.", "a photo."]})
    with pytest.raises(ValueError, match="bad_prompts.json") as err:
        read_prompts(path)
    assert "'a photo.'" in str(err.value) and "{c}" in str(err.value)


def test_wrong_class_count_names_file_and_both_counts(tmp_path):
    path = _write(tmp_path, {"classnames": ["cat", "dog"], "templates": ["a {c}."]})
    with pytest.raises(ValueError, match="bad_prompts.json") as err:
        read_prompts(path, n_classes=3)
    assert "2 class names" in str(err.value) and "3 classes" in str(err.value)


def test_duplicate_after_lowercasing_names_file_and_classes(tmp_path):
    path = _write(tmp_path, {"classnames": ["Red Fox", "wolf", "red  fox"], "templates": ["a photo of a {c}."]})
    with pytest.raises(ValueError, match="bad_prompts.json") as err:
        read_prompts(path)
    message = str(err.value)
    assert "'Red Fox'" in message and "'red  fox'" in message and "0" in message and "2" in message


@pytest.mark.parametrize(
    "obj,fragment",
    [
        ({"classnames": [], "templates": ["{c}"]}, "classnames"),
        ({"classnames": ["a"], "templates": []}, "templates"),
        ({"classnames": ["a", ""], "templates": ["{c}"]}, "classnames[1]"),
        ({"classnames": ["a"], "templates": ["{c}"], "extra": 1}, "extra"),
        (["a"], "JSON object"),
    ],
)
def test_malformed_files_are_rejected_with_the_file_name(tmp_path, obj, fragment):
    path = _write(tmp_path, obj)
    with pytest.raises(ValueError, match="bad_prompts.json") as err:
        read_prompts(path)
    assert fragment in str(err.value)


def test_comment_keys_are_ignored_and_tasks_inherit_templates(tmp_path):
    path = _write(
        tmp_path,
        {
            "_note": "comments are allowed",
            "classnames": ["cat", "dog"],
            "templates": ["a photo of a {c}."],
            "tasks": {
                "colour": {"classnames": ["red", "blue"]},
                "size": {"classnames": ["small", "large"], "templates": ["a {c} object."]},
            },
        },
    )
    assert read_prompts(path).classnames == ("cat", "dog")
    assert read_prompts(path, task="colour").templates == ("a photo of a {c}.",)
    assert read_prompts(path, task="size", n_classes=2).texts() == [["a small object."], ["a large object."]]
    with pytest.raises(ValueError, match="bad_prompts.json") as err:
        read_prompts(path, task="shape")
    assert "colour" in str(err.value)
    with pytest.raises(ValueError, match="tasks.colour"):
        read_prompts(path, task="colour", n_classes=3)


def test_unknown_dataset_prompts_name_the_params_key():
    with pytest.raises(ValueError, match="dataset.name"):
        load_prompts("imagenet")
