"""The release schema and its one writer: FITS = Parquet round trips with units and header cards, streamed FITS =
astropy's own encoding, partitioned tables, the flag table, and atomic publication under kill -9 and a full disk
(real processes, a real tmpfs where mounting is permitted)."""
from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from catalogbuilder.calibrate.flags import FlagThresholds, flag_table_markdown
from catalogbuilder.constants import FLAG_BAD_MASK, FLAG_SPECS, FLAG_WARN_MASK, ResultFlag
from catalogbuilder.crossmatch.match import REQUIRED_BANDS
from catalogbuilder.release import writer
from catalogbuilder.release.schema import (
    PHOTOMETRIC_COLUMNS, PHOTOMETRIC_TARGETS, SPECTRAL_COLUMNS, flag_cards, spectral_columns, table_meta, to_table,
)
from catalogbuilder.files import atomic_write
from catalogbuilder.release.writer import (
    ReleaseTransaction, ReleaseWriteError, partition_files, read_manifest, recover, verify_release,
    write_fits, write_fits_from_parquet, write_partitions, write_table,
)

REPO = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("release_writer_child.py")
sys.path.insert(0, str(CHILD.parent))
import release_writer_child as child  # noqa: E402


def spectral_rows(n: int, seed: int = 3) -> pd.DataFrame:
    """Release rows as the assembly produces them: every kind of column, missing values of each type, a 19-digit
    Gaia id, non-ASCII text (a LAMOST reject reason, a path), and columns the schema does not release."""
    rng = np.random.default_rng(seed)
    index = np.arange(n)
    return pd.DataFrame({
        "spectrum_id": [f"apogee-{i:016x}-0" for i in index], "source_id": [f"2M{i:08d}+0000000" for i in index],
        "survey": "apogee", "kind": "combined", "file": [f"/data/Ångström/apStar-{i}.fits" for i in index],
        "file_sha256": "e" * 64, "row": np.where(index % 5 == 0, np.nan, 0), "visit": 0,
        "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n), "snr": np.where(index % 9 == 0, np.nan, rng.uniform(3, 300, n)),
        "mjd": 59000.5, "good_pixel_fraction": rng.uniform(0, 1, n), "flux_constant": index % 13 == 0,
        "gaia_source_id": pd.array(np.where(index % 4 == 0, None, 6_917_528_997_577_384_320 - index), dtype="Int64"),
        "gaia_sep_arcsec": rng.uniform(0, 1, n), "teff": rng.uniform(3000, 9000, n), "logg": rng.uniform(0, 5, n),
        "e_logg": rng.uniform(0, 0.3, n), "result_flags": rng.integers(0, 4096, n), "flag_warn": index % 2 == 0,
        "flag_bad": index % 3 == 0, "status": "ok", "reason": np.where(index % 6 == 0, "6500 Å arm: zero inverse variance", None),
        "missing_bands": np.where(index % 2 == 0, "phot_bp_mean_mag", ""), "n_draws": 20, "model_name": "anet3",
        "weights_sha256": "5" * 64, "software_version": "0.1.0", "created": "2026-11-23T13:00:00+00:00",
        "grid": "apogee",  # not a release column
    })


def header_meta() -> dict:
    cards = [("SOFTVER", "0.1.0", "catalogbuilder version"), ("MODEL", "anet3", "model name"),
             ("WEIGHTS", "5" * 64, "SHA-256 of the model weights"), ("XRADIUS", 1.0, "[arcsec] cross-match radius"),
             *flag_cards(FlagThresholds(snr_min=5), REQUIRED_BANDS)]
    return table_meta(cards)


@pytest.fixture(scope="module")
def table() -> Table:
    return to_table(spectral_rows(3000), spectral_columns(False), header_meta())


def gunzip(path: Path) -> bytes:
    with gzip.open(path, "rb") as stream:
        return stream.read()


def released_files(out: Path) -> set[str]:
    """Visible files of a release folder (what a reader globbing the folder sees), manifest excluded."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)} - {"manifest.json"}


# --- schema and flag table ---------------------------------------------------------------------------------------

def test_flag_specs_are_the_result_flags_and_define_the_masks() -> None:
    assert [spec.flag for spec in FLAG_SPECS] == list(ResultFlag) and [spec.bit for spec in FLAG_SPECS] == list(range(12))
    assert {spec.group for spec in FLAG_SPECS} == {"bad", "warn"}
    assert sum(int(s.flag) for s in FLAG_SPECS if s.group == "warn") == int(FLAG_WARN_MASK) == 0b1111000000
    assert int(FLAG_WARN_MASK) | int(FLAG_BAD_MASK) == 4095 and not int(FLAG_WARN_MASK) & int(FLAG_BAD_MASK)
    rules = FlagThresholds(snr_min=5, e_logg_max=0.25).describe(["tmass_j", "parallax"])
    assert rules[ResultFlag.RESULT_UNRELIABLE].startswith("snr < 5, good-pixel fraction < 0.5")
    assert rules[ResultFlag.E_LOGG_LARGE] == "e_logg > 0.25 dex" and rules[ResultFlag.TEFF_UNRELIABLE].endswith("3.1 < log10(teff) < 4.7")
    assert "a missing band of tmass_j,parallax, or an input the model imputed" in rules[ResultFlag.MISSING_PHOTOMETRY]
    assert all(text.isascii() for text in rules.values())  # they go into FITS headers


def test_readme_flag_table_is_the_rendered_flag_specs() -> None:
    readme = (REPO / "README.md").read_text()
    assert flag_table_markdown(REQUIRED_BANDS) in readme


def test_photometric_schema_follows_the_models_targets() -> None:
    from catalogbuilder.models.photometric import TARGETS
    from catalogbuilder.photometric.stage import OUTPUT_COLUMNS, VALUE_COLUMNS

    assert PHOTOMETRIC_TARGETS == TARGETS and set(VALUE_COLUMNS) <= set(OUTPUT_COLUMNS)
    assert [spec.name for spec in PHOTOMETRIC_COLUMNS] == list(OUTPUT_COLUMNS)


def test_typed_table_has_units_descriptions_and_types(table: Table) -> None:
    assert table.colnames == [spec.name for spec in spectral_columns(False)] and "grid" not in table.colnames
    assert "rv" in [spec.name for spec in SPECTRAL_COLUMNS] and "rv" not in table.colnames
    assert str(table["teff"].unit) == "K" and str(table["logg"].unit) == "dex" and table["snr"].unit is None
    assert table["flux_constant"].dtype == bool and table["row"].dtype == np.int64 and table["row"][0] == -1
    assert table["gaia_source_id"].mask[0] and table["gaia_source_id"][1] == 6_917_528_997_577_384_319
    assert table["reason"][1] == "" and table["tmass_j"].dtype == np.float64 and np.isnan(table["tmass_j"]).all()
    assert table["teff"].description == "effective temperature"
    assert table.meta["FLAG10"][0].startswith("RESULT_UNRELIABLE: snr < 5")


# --- FITS and Parquet --------------------------------------------------------------------------------------------

def test_fits_and_parquet_round_trip_with_units_and_cards(table: Table, tmp_path: Path) -> None:
    with ReleaseTransaction(tmp_path) as release:
        fits_path, parquet_path = write_table(table, release, "apogee/anet3/allStar-anet3-apogee", "ALLSTAR", ("SOFTVER", "MODEL"))
        release.commit()
    with fits.open(fits_path) as hdul:
        hdul.verify("exception")
        assert hdul[0].header["SOFTVER"] == "0.1.0" and "WEIGHTS" not in hdul[0].header
        header, columns = hdul[1].header, hdul[1].columns
        assert hdul[1].name == "ALLSTAR" and header["NAXIS2"] == 3000 and header["WEIGHTS"] == "5" * 64
        assert header["FLAG10"].startswith("RESULT_UNRELIABLE: snr < 5,") and header["FLAGBAD"] == int(FLAG_BAD_MASK)
        assert header.comments["XRADIUS"] == "[arcsec] cross-match radius"
        units = {column.name: column.unit for column in columns}
        assert units["teff"] == "K" and units["ra"] == "deg" and units["gaia_sep_arcsec"] == "arcsec" and units["logg"] is None
        logg = columns.names.index("logg") + 1
        assert header[f"TCOMM{logg}"] == "[dex] surface gravity log10(g / cm s-2)"
        assert columns["gaia_source_id"].null == 999999 and columns["flux_constant"].format == "L"
        assert columns["reason"].format == "36A"  # the longest reason once escaped: '6500 \\xc5 arm: zero inverse variance'
    from_fits = Table.read(fits_path, hdu=1, mask_invalid=False)
    from_parquet = pd.read_parquet(parquet_path)
    assert from_fits.colnames == list(from_parquet.columns) == table.colnames
    for name in table.colnames:
        expected, fits_values, parquet_values = table[name], from_fits[name], from_parquet[name]
        if name == "gaia_source_id":  # exact 64-bit ids, null where none
            assert list(fits_values.filled(0)) == list(parquet_values.fillna(0)) == list(expected.filled(0))
            assert list(fits_values.mask) == list(parquet_values.isna()) == list(expected.mask)
        elif expected.dtype.kind == "f":
            np.testing.assert_array_equal(fits_values, expected)
            np.testing.assert_array_equal(parquet_values, expected)
        elif expected.dtype.kind == "U":  # Parquet keeps the text, FITS holds it ASCII-escaped
            assert list(parquet_values) == list(expected)
            assert list(fits_values) == [writer.fits_text(text) for text in expected]
        else:
            assert list(fits_values) == list(parquet_values) == list(expected), name
    assert from_fits["file"][0] == "/data/\\xc5ngstr\\xf6m/apStar-0.fits" and from_parquet["file"][0] == "/data/Ångström/apStar-0.fits"
    metadata = {key.decode(): value for key, value in pq.read_schema(parquet_path).metadata.items()}
    assert json.loads(metadata["units"])["logg"] == "dex" and json.loads(metadata["units"])["teff"] == "K"
    assert json.loads(metadata["descriptions"])["teff"] == "effective temperature"
    assert json.loads(metadata["catalogbuilder"])["FLAGBAD"] == int(FLAG_BAD_MASK)
    assert str(from_parquet["gaia_source_id"].dtype) == "Int64"


def test_streamed_fits_is_what_astropy_writes_for_the_same_rows(table: Table, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows streamed in many small batches are the bytes astropy writes for the same rows (its own table_to_hdu
    of the escaped table) under the same header cards."""
    monkeypatch.setattr(writer, "BATCH_ROWS", 257)
    ours = write_fits(table, tmp_path / "ours.fits.gz", "ALLSTAR", ("SOFTVER",))
    with fits.open(ours) as hdul:
        escaped = table.copy()
        for name in escaped.colnames:
            escaped[name].unit = None  # TUNIT/TCOMM are ours: compare the encoding of the rows
            if escaped[name].dtype.kind == "U":
                escaped[name] = [writer.fits_text(text) for text in escaped[name]]
        escaped["gaia_source_id"].fill_value = hdul[1].columns["gaia_source_id"].null
        data = fits.table_to_hdu(escaped).data
        theirs = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(header=hdul[0].header), fits.BinTableHDU(data=data, header=hdul[1].header)]).writeto(theirs)
    ours_bytes, theirs_bytes = gunzip(ours), theirs.getvalue()
    with fits.open(io.BytesIO(ours_bytes)) as mine, fits.open(io.BytesIO(theirs_bytes)) as reference:
        start, reference_start = mine[1].fileinfo()["datLoc"], reference[1].fileinfo()["datLoc"]
        layout = ("NAXIS", "TFIELDS", "TTYPE", "TFORM", "TNULL")  # what says how the rows are encoded
        assert [str(card) for card in mine[1].header.cards if card.keyword.startswith(layout)] == \
            [str(card) for card in reference[1].header.cards if card.keyword.startswith(layout)]
    assert len(ours_bytes) % 2880 == 0 and ours_bytes[start:] == theirs_bytes[reference_start:]  # rows and padding


def test_partitioned_table_replace_delete_and_fits_from_parts(table: Table, tmp_path: Path) -> None:
    chunks = {f"{i:03d}": table[i * 500:(i + 1) * 500] for i in range(6)}
    with ReleaseTransaction(tmp_path) as release:
        write_partitions(release, "apogee/parts", {key: chunks[key] for key in ("000", "001", "002")})
        release.commit()
    new_001 = table[2500:2600]
    with ReleaseTransaction(tmp_path) as release:
        write_partitions(release, "apogee/parts", {"001": new_001, "003": chunks["003"]}, delete=["002"])
        view = release.partitions("apogee/parts")
        assert [p.name for p in view] == ["part-000.parquet", "part-001.parquet", "part-003.parquet"]
        assert view[0].parent == tmp_path / "apogee/parts" and writer.STAGING_NAME in view[1].parts  # kept / staged
        rows = write_fits_from_parquet(view, release.path("apogee/all.fits.gz"), "ALLSTAR", meta={"NROWS": (1100, "rows")},
                                       batch_rows=128)
        manifest = release.commit({"store_snapshot": "abc123"})
    assert rows == 1100 and [p.name for p in partition_files(tmp_path / "apogee/parts")] == ["part-000.parquet", "part-001.parquet", "part-003.parquet"]
    assert set(manifest["files"]) == {"apogee/parts/part-000.parquet", "apogee/parts/part-001.parquet", "apogee/parts/part-003.parquet", "apogee/all.fits.gz"}
    assert manifest["files"]["apogee/all.fits.gz"]["rows"] == 1100 and manifest["files"]["apogee/parts/part-001.parquet"]["rows"] == 100
    assert manifest["commits"][manifest["commit"]]["provenance"] == {"store_snapshot": "abc123"} and len(manifest["commits"]) == 2
    assert verify_release(tmp_path) == [] and released_files(tmp_path) == set(manifest["files"])
    expected = pd.concat([chunks["000"].to_pandas(), new_001.to_pandas(), chunks["003"].to_pandas()], ignore_index=True)
    dataset = pd.read_parquet(tmp_path / "apogee/parts")  # the folder reads as one dataset
    pd.testing.assert_series_equal(dataset["spectrum_id"], expected["spectrum_id"], check_dtype=False)
    from_fits = Table.read(tmp_path / "apogee/all.fits.gz", hdu=1, mask_invalid=False)
    assert list(from_fits["spectrum_id"]) == list(expected["spectrum_id"])
    assert list(from_fits["gaia_source_id"].filled(-1)) == list(expected["gaia_source_id"].fillna(-1))
    np.testing.assert_array_equal(from_fits["teff"], expected["teff"])
    assert list(from_fits["reason"]) == [writer.fits_text(text) for text in expected["reason"]]
    assert fits.getheader(tmp_path / "apogee/all.fits.gz", 1)["NROWS"] == 1100
    # the same rows written from memory give the same FITS bytes
    whole = write_fits(Table.from_pandas(expected), tmp_path / "whole.fits.gz", "ALLSTAR")
    with fits.open(whole) as a, fits.open(tmp_path / "apogee/all.fits.gz") as b:
        assert a[1].data.tobytes() == b[1].data.tobytes()


def test_parts_with_different_columns_are_refused(table: Table, tmp_path: Path) -> None:
    writer.write_parquet(table[:10], tmp_path / "a.parquet")
    writer.write_parquet(table[:10][["spectrum_id", "teff"]], tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="columns differ"):
        write_fits_from_parquet([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "x.fits.gz", "X")
    with pytest.raises(ValueError, match="partition key"):
        writer.part_name("../evil")


# --- transactions --------------------------------------------------------------------------------------------------

def test_failed_or_abandoned_transaction_leaves_the_previous_release(table: Table, tmp_path: Path) -> None:
    with ReleaseTransaction(tmp_path) as release:
        write_table(table[:100], release, "t", "T")
        before = release.commit()
    with pytest.raises(RuntimeError, match="boom"), ReleaseTransaction(tmp_path) as release:
        write_table(table[:50], release, "t", "T")
        raise RuntimeError("boom")
    with ReleaseTransaction(tmp_path) as release:  # no commit: nothing published
        release.delete("t.parquet")
    assert read_manifest(tmp_path) == before and verify_release(tmp_path) == [] and not (tmp_path / writer.STAGING_NAME).exists()
    with pytest.raises(ValueError, match="inside the release"), ReleaseTransaction(tmp_path) as release:
        release.path("../outside.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ReleaseTransaction(tmp_path / "file")


def test_injected_enospc_while_staging_is_one_line_and_keeps_the_release(table: Table, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with ReleaseTransaction(tmp_path) as release:
        write_table(table[:200], release, "t", "T")
        before = release.commit()
    original, written = gzip.GzipFile.write, [0]

    def full_disk(self, data):  # noqa: ANN001, ANN202 - the disk fills up 20 kB into the FITS stream
        written[0] += len(data)
        if written[0] > 20_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / writer.STAGING_NAME / "t.fits.gz"))
        return original(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", full_disk)
    with pytest.raises(ReleaseWriteError) as caught, ReleaseTransaction(tmp_path) as release:
        write_table(table, release, "t", "T")
        release.commit()
    message = str(caught.value)
    assert "\n" not in message and "No space left on device" in message and "previous release is unchanged" in message
    assert read_manifest(tmp_path) == before and verify_release(tmp_path) == [] and not (tmp_path / writer.STAGING_NAME).exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub/matches.parquet"
    with atomic_write(target) as temporary:
        temporary.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["matches.parquet"]
    with pytest.raises(ValueError, match="is a folder"), atomic_write(tmp_path):
        pass


# --- crash tests with real processes -------------------------------------------------------------------------------

def run_child(out: Path, version: int, kill_at: str = "none") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(CHILD), str(out), str(version), kill_at], env=env, capture_output=True,
                          text=True, timeout=300)


def expected_state(version: int) -> dict[str, list[int]]:
    """Per visible file of release ``version``: the versions of its rows (partitioned parts accumulate)."""
    parts: dict[str, int] = {}
    for step in range(1, version + 1):
        written, deleted = child.PARTS[step]
        parts.update({key: step for key in written})
        for key in deleted:
            parts.pop(key)
    state = {f"t/parts/part-{key}.parquet": [v] * child.ROWS_PER_PART for key, v in sorted(parts.items())}
    state["t/all.fits.gz"] = [v for key in sorted(parts) for v in [parts[key]] * child.ROWS_PER_PART]
    state["summary.json"] = [version]
    return state


def release_state(out: Path) -> dict[str, list[int]]:
    """What a reader finds in the folder: per visible file, the versions of its rows."""
    state = {}
    for relative in released_files(out):
        path = out / relative
        if relative.endswith(".parquet"):
            state[relative] = pd.read_parquet(path)["version"].tolist()
        elif relative.endswith(".fits.gz"):
            state[relative] = Table.read(path, hdu=1)["version"].tolist()
        else:
            state[relative] = [json.loads(path.read_text())["version"]]
    return state


def assert_one_whole_release(out: Path) -> int:
    """The folder holds exactly one complete release (1 or 2), as its manifest says; returns its version."""
    manifest = read_manifest(out)  # completes a committed publication first
    version = manifest["commits"][manifest["commit"]]["provenance"]["version"]
    assert verify_release(out) == [] and set(manifest["files"]) == released_files(out)
    assert release_state(out) == expected_state(version)
    assert not (out / writer.STAGING_NAME / writer.COMMIT_NAME).exists()
    return version


@pytest.fixture(scope="module")
def first_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("release-v1")
    result = run_child(out, 1)
    assert result.returncode == 0, result.stderr
    assert assert_one_whole_release(out) == 1
    return out


@pytest.mark.parametrize(("kill_at", "published"), [
    ("gzip", 1), ("commit", 1), ("move-2", 2), ("delete", 2), ("manifest", 2),
])
def test_kill_9_at_any_point_leaves_one_whole_release(first_release: Path, tmp_path: Path, kill_at: str, published: int) -> None:
    out = tmp_path / "release"
    shutil.copytree(first_release, out)
    before = {relative: (out / relative).read_bytes() for relative in released_files(out)}
    result = run_child(out, 2, kill_at)
    assert result.returncode == -9, result.stderr
    assert (out / writer.STAGING_NAME).exists()
    if published == 1:  # killed before the commit point: the previous release was never touched
        assert {relative: (out / relative).read_bytes() for relative in released_files(out)} == before
    assert assert_one_whole_release(out) == published
    assert not (out / writer.STAGING_NAME).exists() or published == 1
    result = run_child(out, 2)  # the next run discards or has completed the interrupted one, then publishes
    assert result.returncode == 0, result.stderr
    assert assert_one_whole_release(out) == 2 and not (out / writer.STAGING_NAME).exists()


def test_kill_9_during_the_roll_forward_is_finished_by_recover(first_release: Path, tmp_path: Path) -> None:
    out = tmp_path / "release"
    shutil.copytree(first_release, out)
    assert run_child(out, 2, "move-2").returncode == -9
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(CHILD.parent), os.environ.get("PYTHONPATH", "")])}
    script = ("import sys; from pathlib import Path; import release_writer_child as c; from catalogbuilder.release import writer; "
              "c.arm('delete', Path(sys.argv[1])); writer.recover(sys.argv[1])")
    assert subprocess.run([sys.executable, "-c", script, str(out)], env=env, timeout=300).returncode == -9
    assert recover(out) is not None and assert_one_whole_release(out) == 2


@pytest.fixture
def tiny_tmpfs(tmpfs) -> Path:  # noqa: ANN001 - the conftest factory
    """A 600 kB tmpfs (skips where mounting is not permitted, e.g. without root)."""
    return tmpfs("600k")


def test_full_disk_keeps_the_previous_release(tiny_tmpfs: Path, table: Table) -> None:
    out = tiny_tmpfs / "release"
    with ReleaseTransaction(out) as release:
        write_table(table[:300], release, "t", "T")
        before = release.commit()
    with pytest.raises(ReleaseWriteError, match="No space left on device.*previous release is unchanged"):
        with ReleaseTransaction(out) as release:
            for copy in range(20):
                write_table(table, release, f"t{copy}", "T")
            release.commit()
    assert read_manifest(out) == before and verify_release(out) == [] and not (out / writer.STAGING_NAME).exists()


def test_photometric_cli_on_a_full_disk_exits_1_with_one_line(tiny_tmpfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from catalogbuilder.cli import main

    source = tmp_path / "sources.csv"
    rng = np.random.default_rng(4)
    pd.DataFrame({"source_id": [f"2M{i:08d}" for i in range(40)], "ra": rng.uniform(0, 360, 40), "dec": rng.uniform(-30, 60, 40),
                  "j_m": rng.uniform(8, 12, 40), "h_m": rng.uniform(7, 11, 40), "ks_m": rng.uniform(7, 11, 40),
                  "phot_g_mean_mag": rng.uniform(10, 14, 40), "parallax": rng.uniform(0.2, 5, 40)}).to_csv(source, index=False)
    out = tiny_tmpfs / "out"
    assert main(["photometric", "--input", str(source), "--out", str(out), "--draws", "2"]) == 0
    before = read_manifest(out)
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError):  # fill the disk, then free 16 kB
        while True:
            handle.write(b"\0" * 4096)
    os.truncate(filler, filler.stat().st_size - 16_384)
    capsys.readouterr()
    assert main(["photometric", "--input", str(source), "--out", str(out), "--draws", "2"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "No space left on device" in error and "unchanged" in error
    assert read_manifest(out) == before and verify_release(out) == []
