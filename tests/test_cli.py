import argparse

import pytest

from agd.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*prefix, name))


def test_every_sub_command_has_help(capsys):
    commands = list(_walk(build_parser()))
    assert ("data", "fetch") in commands and ("data", "prepare") in commands and ("catalog",) in commands
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: agd") and len(out) > 80, command


def test_bad_params_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  split: {train: 0.9, val: 0.2, test: 0.2}\n  dedupe: first\n")
    assert main(["--params", str(bad), "data", "prepare", "--raw", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "prepare.split" in err and "must be 1" in err
    assert "prepare.dedupe" in err and "Traceback" not in err


def test_campaign_commands_name_the_missing_input_and_the_unknown_campaign(tmp_path, capsys):
    missing = tmp_path / "none"
    common = ["--prepared", str(missing / "d.parquet"), "--out", str(tmp_path / "exp"), "--no-mlflow"]
    assert main(["experiments", *common]) == 2
    err = capsys.readouterr().err
    assert "no prepared dataset" in err and "agd data prepare" in err and "Traceback" not in err
    assert main(["catalog", "--dataset", str(missing), "--load", "al_samples"]) == 2
    assert "prepared dataset" in capsys.readouterr().err


def test_a_candidate_search_names_the_missing_candidate_table(campaign_models, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("experiments:\n  campaign:\n    search: candidates\n")
    inputs = ["--prepared", str(campaign_models.prepared), "--autoencoder", str(campaign_models.autoencoder)]
    inputs += ["--oracle", str(campaign_models.oracle), "--candidates", str(tmp_path / "none.parquet")]
    assert (
        main(["--params", str(params), "experiments", *inputs, "--out", str(tmp_path / "e"), "--no-mlflow"])
        == 2
    )
    err = capsys.readouterr().err
    assert "none.parquet: no candidate table" in err and "agd generate" in err and "Traceback" not in err


def test_catalog_load_needs_table_equals_path(tmp_path, capsys):
    import pandas as pd

    data = tmp_path / "d.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(data)
    assert (
        main(["catalog", "--db", str(tmp_path / "c.duckdb"), "--dataset", str(data), "--load", "al_samples"])
        == 2
    )
    assert "expected TABLE=PATH" in capsys.readouterr().err
    args = ["--load", f"nosuchtable={data}"]
    assert main(["catalog", "--db", str(tmp_path / "c.duckdb"), "--dataset", str(data), *args]) == 2
    assert "nosuchtable" in capsys.readouterr().err


def test_catalog_load_if_present_skips_a_missing_file_and_loads_a_present_one(tmp_path):
    import pandas as pd

    from agd.config import PrepareConfig
    from agd.data.prepare import prepare_dataset, write_prepared
    from agd.tracking.catalog import CatalogReader

    raw = pd.DataFrame({"row": [1, 2], "formula": ["NaCl", "MgO"], "band_gap": [5.0, 4.5]})
    dataset = write_prepared(prepare_dataset(raw, PrepareConfig()), tmp_path / "prep")["dataset"]
    dft = tmp_path / "dft.parquet"
    db = tmp_path / "c.duckdb"
    args = ["catalog", "--db", str(db), "--dataset", str(dataset), "--load-if-present", f"dft_results={dft}"]
    assert main(args) == 0
    with CatalogReader(db) as reader:
        assert reader.tables()["dft_results"] == 0
    pd.DataFrame({"formula": ["NaCl"], "path": ["runs/NaCl"], "band_gap": [5.1]}).to_parquet(dft)
    assert main(args) == 0
    with CatalogReader(db) as reader:
        assert reader.table("dft_results")["band_gap"].tolist() == [5.1]
