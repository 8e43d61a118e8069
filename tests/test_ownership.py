"""fastcifar deletes or overwrites only what it wrote: stores, runs, sweeps, reports, bench files, temp files.

The last test is a property test: any command with random --out, recipe name and --force choices leaves every
file it did not create exactly as it was, and writes nothing outside its sandbox.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import make_image_folder

from fastcifar.cli import main
from fastcifar.data import prepare_store
from fastcifar.recipe import RecipeError, load_recipe, recipe_from_dict, recipe_to_toml
from fastcifar.typed_toml import toml_value

CLASSES = ("cat", "dog")


def quiet(*_):
    pass


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below root (hidden ones included)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcifar: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def user_data(tmp_path) -> Path:
    """The issue's reproduction: an image-folder tree at data/cifar10/ with the user's notes beside the images."""
    src = tmp_path / "data" / "cifar10"
    make_image_folder(src, 2, 1, "png", classes=CLASSES)
    (src / "notes.txt").write_text("my notes")
    return src


# --- prepare -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["data/cifar10", "data", ".", "data/cifar10/train", "data/cifar10/store"])
@pytest.mark.parametrize("force", [False, True])
def test_prepare_never_replaces_or_writes_into_its_source(user_data, tmp_path, monkeypatch, capsys, out, force):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(["prepare", "--source", "data/cifar10", "--out", out] + ["--force"] * force) == 2
    err = one_error(capsys)
    assert "source" in err and out in err
    assert snapshot(tmp_path) == before  # not one file removed, changed or added


@pytest.mark.parametrize("force", [False, True])
def test_prepare_never_replaces_a_user_file_or_folder(user_data, tmp_path, capsys, force):
    precious = tmp_path / "precious.txt"
    precious.write_text("thesis")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    before = snapshot(tmp_path)
    for out in (precious, folder):
        assert main(["prepare", "--source", str(user_data), "--out", str(out)] + ["--force"] * force) == 2
        err = one_error(capsys)
        assert str(out) in err and ("not a directory" in err or "a.txt" in err)
    assert snapshot(tmp_path) == before


def test_force_replaces_only_a_clean_fastcifar_store(user_data, tmp_path, capsys):
    out = tmp_path / "store"
    prepare_store(user_data, out, log=quiet)
    assert (out / ".fastcifar-store").is_file()
    other = tmp_path / "other"
    make_image_folder(other, 1, 1, "png", classes=("a", "b", "c"))
    assert main(["prepare", "--source", str(other), "--out", str(out)]) == 2
    assert "--force" in one_error(capsys)
    (out / "my-analysis.ipynb").write_text("{}")  # the user put a file into the store folder
    assert main(["prepare", "--source", str(other), "--out", str(out), "--force"]) == 2
    err = one_error(capsys)
    assert "my-analysis.ipynb" in err and "even with --force" in err and "meta.json" not in err
    (out / "my-analysis.ipynb").unlink()
    assert main(["prepare", "--source", str(other), "--out", str(out), "--force"]) == 0
    assert "a, b, c" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".store.")]


def test_symlinked_store_folder_is_replaced_where_it_lives(user_data, tmp_path):
    real = tmp_path / "disk" / "store"
    prepare_store(user_data, real, log=quiet)
    link = tmp_path / "store"
    link.symlink_to(real)
    other = tmp_path / "other"
    make_image_folder(other, 1, 1, "png", classes=("a", "b", "c"))
    prepare_store(other, link, force=True, log=quiet)
    assert link.is_symlink() and (real / "meta.json").read_text().count('"c"') == 1


# --- train / sweep / report / bench -----------------------------------------------------------------------------


@pytest.fixture
def recipe_file(store, tmp_path) -> Path:
    path = tmp_path / "r.toml"
    table = tiny_table(store, train={"epochs": 1}, data={"train_subset": 4}, model={"name": "cnn_bn", "width": 4})
    path.write_text(recipe_to_toml(recipe_from_dict(table)))
    return path


def test_train_refuses_a_folder_that_is_not_a_run(recipe_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.csv").write_text("my own numbers\n")
    (mine / "recipe.toml").write_text("my notes\n")
    before = snapshot(mine)
    for resume in ([], ["--resume"]):
        assert main(["train", str(recipe_file), "--out", str(mine), *resume]) == 2
        assert "fastcifar did not write" in one_error(capsys)
    assert snapshot(mine) == before  # not even a .lock
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(recipe_file), "--out", str(empty)]) == 0
    assert (empty / ".fastcifar-run").is_file() and (empty / "data.json").is_file()


def test_orphan_cleanup_touches_only_its_own_temp_files_in_its_own_folders(recipe_file, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(run)]) == 0
    ours = [run / ".metrics.csv.ab12cd_9.tmp", run / "checkpoints" / ".last.pt.x1y2z3w4.tmp"]
    theirs = [run / "notes" / ".draft.ab12cd_9.tmp", run / ".my.tmp", run / "checkpoints" / ".a.b.TOOLONG99.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")
    assert main(["train", str(recipe_file), "--out", str(run), "--resume"]) == 0
    assert not any(p.exists() for p in ours) and all(p.read_text() == "x" for p in theirs)


@pytest.mark.parametrize("name", ["../x", "..", ".", "/tmp/fastcifar-abs-name", "a/b", "a\nb", "-rf", "x" * 101])
def test_recipe_name_is_one_plain_path_component(store, name):
    with pytest.raises(RecipeError, match=r"^name: must be one plain folder name") as e:
        recipe_from_dict(tiny_table(store) | {"name": name})
    assert "\n" not in str(e.value)


def test_newline_in_a_string_value_keeps_the_saved_recipe_readable(store, tmp_path):
    recipe = recipe_from_dict(tiny_table(store, eval={"gradcam_layer": 'a"b\\c\nd\x7f'}))
    path = tmp_path / "saved.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(path) == recipe


def test_report_and_bench_outputs_never_overwrite_user_files(recipe_file, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert main(["train", str(recipe_file), "--out", str(run)]) == 0
    mine = tmp_path / "report.md"
    mine.write_text("# my report\n")
    assert main(["report", str(a), str(b), "--out", str(mine)]) == 2
    assert "not a run comparison fastcifar wrote" in one_error(capsys) and mine.read_text() == "# my report\n"
    ours = tmp_path / "cmp.md"
    assert main(["report", str(a), str(b), "--out", str(ours)]) == 0
    assert main(["report", str(a), str(b), "--out", str(ours)]) == 0  # its own comparison: replaced
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "result.json").write_text("{}")
    (folder / "report.md").write_text("mine")
    assert main(["report", str(folder)]) == 2
    assert "not a fastcifar run folder" in one_error(capsys) and (folder / "report.md").read_text() == "mine"
    capsys.readouterr()
    for flag, name in (("--json", "numbers.json"), ("--md", "table.md")):
        (tmp_path / name).write_text('{"mine": 1}')
        assert main(["bench", "--data", str(recipe_file.parent), flag, str(tmp_path / name)]) == 2
        assert "fastcifar wrote" in one_error(capsys) and (tmp_path / name).read_text() == '{"mine": 1}'


def test_sweep_refuses_a_user_folder(recipe_file, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    assert main(["sweep", str(recipe_file), "--vary", "optim.lr=0.1", "--out", str(mine)]) == 2
    assert "fastcifar did not write" in one_error(capsys)
    assert [p.name for p in mine.iterdir()] == ["data.csv"]


# --- property: no command removes or changes a file it did not create ---------------------------------------


SANDBOX_NAMES = ["new", "empty", "userdir", "userfile.txt", "src", ".", "store", "run", "src/train", "-"]
NAMES = ["tiny", "ok", "../escape", "..", "/tmp/fastcifar-prop-abs", "a\nb", "runs"]
OWNED = ("store/", "run/")  # fastcifar's own: a forced prepare or a resumed run may change them


@pytest.fixture(scope="module")
def template(store, tmp_path_factory) -> Path:
    """The user's source images and files, empty and full folders, plus a fastcifar store and run."""
    root = tmp_path_factory.mktemp("template") / "box"
    make_image_folder(root / "src", 2, 1, "png", classes=CLASSES)
    (root / "src" / "notes.txt").write_text("notes")
    (root / "empty").mkdir()
    (root / "userdir").mkdir()
    (root / "userdir" / "thesis.tex").write_text("thesis")
    (root / "userdir" / ".hidden.abcdefgh.tmp").write_text("mine")  # atomic_open's naming, but not its folder
    (root / "userfile.txt").write_text("file")
    prepare_store(root / "src", root / "store", log=quiet)
    table = tiny_table(store, train={"epochs": 1}, data={"train_subset": 4}, model={"name": "cnn_bn", "width": 4})
    (root / "r.toml").write_text(recipe_to_toml(recipe_from_dict(table)))
    assert main(["train", str(root / "r.toml"), "--out", str(root / "run")]) == 0
    return root


def _command(kind: str, out: str, name: str, force: bool) -> list[str]:
    if kind == "prepare":
        return ["prepare", "--source", "src"] + (["--out", out] if out != "-" else []) + ["--force"] * force
    if kind == "report":
        return ["report", "run", "run", "--out", "cmp.md" if out == "-" else out]
    text = Path("r.toml").read_text().replace('name = "tiny"', f"name = {toml_value(name)}", 1)
    Path("r.toml").write_text(text)
    where = ["--out", out] if out != "-" else []
    if kind == "sweep":
        return ["sweep", "r.toml", "--vary", "optim.lr=0.1"] + where
    return ["train", "r.toml"] + where + ["--resume"] * force


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["prepare", "train", "sweep", "report"]), out=st.sampled_from(SANDBOX_NAMES),
       name=st.sampled_from(NAMES), force=st.booleans())
def test_property_no_command_touches_what_it_did_not_write(template, kind, out, name, force):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "box"
        shutil.copytree(template, root, symlinks=True)
        before = {k: v for k, v in snapshot(root).items() if not k.startswith(OWNED) and k != "r.toml"}
        absolute = set(Path("/tmp").glob("fastcifar-prop-abs*"))
        old = os.getcwd()
        os.chdir(root)
        try:
            main(_command(kind, out, name, force))
        finally:
            os.chdir(old)
        after = snapshot(root)
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
        assert not changed, f"{kind} --out {out} name={name!r} force={force} removed or changed {changed}"
        assert [p.name for p in Path(tmp).iterdir()] == ["box"]  # nothing written beside the sandbox
        assert set(Path("/tmp").glob("fastcifar-prop-abs*")) == absolute
