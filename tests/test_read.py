"""Lazy slide reading: every supported layout written by real tools, shared sample files, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from nuclei_app.errors import BadDataError, ExitCode, MissingInputError, UsageError
from nuclei_app.io.slides import channel_percentiles, open_slide, read_image
from nuclei_app.core.channels import select_nuclear_channels
from nuclei_app.io.ome_tiff import downsample_mean2, write_ome_tiff
from nuclei_app.io.ome_zarr import write_ome_zarr_image

NAMES = ["DAPI", "Histone H3", "NeuN"]


def _image(shape=(3, 300, 420), dtype=np.uint16, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 20, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 0), min(info.max, 4000), shape, endpoint=True).astype(dtype)


def _ome_metadata(names, pixel_size=(0.65, 0.65)):
    return {
        "axes": "CYX",
        "Channel": {"Name": list(names)},
        "PhysicalSizeY": pixel_size[0],
        "PhysicalSizeYUnit": "µm",
        "PhysicalSizeX": pixel_size[1],
        "PhysicalSizeXUnit": "µm",
    }


def _assert_regions_match(slide, levels: list[np.ndarray]) -> None:
    """read_region equals slicing the full level, for interior, edge and out-of-bounds windows."""
    for level, full in enumerate(levels):
        _, size_y, size_x = full.shape
        windows = [
            (0, 0, size_y, size_x),
            (size_y // 3, size_x // 4, max(1, size_y // 3), max(1, size_x // 2)),
            (size_y - 7, size_x - 9, 50, 50),  # clipped at the bottom-right
            (-5, -3, 20, 30),  # clipped at the top-left
        ]
        for y0, x0, height, width in windows:
            for channels in (None, [full.shape[0] - 1, 0]):
                got = slide.read_region(y0, x0, height, width, level=level, channels=channels)
                chosen = list(range(full.shape[0])) if channels is None else channels
                want = full[chosen, max(0, y0) : y0 + height, max(0, x0) : x0 + width]
                assert got.dtype == full.dtype
                np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------
# OME-TIFF and TIFF variants written with tifffile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_tiled_pyramidal_ome_tiff_in_subifds(tmp_path, dtype, bigtiff):
    image = _image(dtype=dtype)
    level1 = image[:, ::2, ::2].copy()
    level2 = image[:, ::4, ::4].copy()
    path = tmp_path / ("slide.ome.btf" if bigtiff else "slide.ome.tif")
    options = dict(tile=(64, 64), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=True) as writer:
        writer.write(image, subifds=2, metadata=_ome_metadata(NAMES), **options)
        writer.write(level1, subfiletype=1, **options)
        writer.write(level2, subfiletype=1, **options)
    with open_slide(path) as slide:
        assert slide.format == "ome-tiff"
        assert slide.level_shapes == [(3, 300, 420), (3, 150, 210), (3, 75, 105)]
        assert slide.shape == (3, 300, 420) and slide.n_levels == 3
        assert slide.dtype == np.dtype(dtype)
        assert slide.channel_names == NAMES
        assert slide.pixel_size_um == pytest.approx((0.65, 0.65))
        assert slide.downsample_factor(2) == (4.0, 4.0)
        assert slide.level_pixel_size_um(1) == pytest.approx((1.3, 1.3))
        _assert_regions_match(slide, [image, level1, level2])


def test_stripped_ome_tiff_with_nanometre_pixel_size(tmp_path):
    image = _image(shape=(2, 130, 90))
    path = tmp_path / "stripped.ome.tif"
    metadata = {"axes": "CYX", "Channel": {"Name": ["Hoechst", "CD3"]},
                "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 650.0, "PhysicalSizeYUnit": "nm"}
    tifffile.imwrite(path, image, ome=True, metadata=metadata, rowsperstrip=16, photometric="minisblack")
    with open_slide(path) as slide:
        assert not tifffile.TiffFile(path).pages[0].is_tiled
        assert slide.pixel_size_um == pytest.approx((0.65, 0.325))
        assert slide.channel_names == ["Hoechst", "CD3"]
        _assert_regions_match(slide, [image])


def test_samples_per_pixel_become_channels(tmp_path):
    rgb = _image(shape=(120, 100, 3), dtype=np.uint8)
    path = tmp_path / "rgb.ome.tif"
    tifffile.imwrite(path, rgb, ome=True, photometric="rgb", tile=(32, 32))
    with open_slide(path) as slide:
        assert slide.level_shapes == [(3, 120, 100)]
        assert slide.channel_names == ["channel_0", "channel_1", "channel_2"]
        _assert_regions_match(slide, [np.moveaxis(rgb, -1, 0)])


def test_multi_series_ome_tiff_selects_series(tmp_path):
    first, second = _image(shape=(2, 40, 50), seed=1), _image(shape=(3, 60, 30), seed=2)
    path = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(first, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "A"]}}, photometric="minisblack")
        writer.write(second, metadata={"axes": "CYX", "Channel": {"Name": ["B", "C", "Hoechst"]}},
                     photometric="minisblack")
    with open_slide(path, series=1) as slide:
        assert slide.series == 1
        assert slide.channel_names == ["B", "C", "Hoechst"]
        _assert_regions_match(slide, [second])
    np.testing.assert_array_equal(read_image(path), first)
    with pytest.raises(UsageError, match="series 2 does not exist"):
        open_slide(path, series=2)


def test_plain_tiff_has_unknown_pixel_size_and_z_selection(tmp_path):
    stack = _image(shape=(3, 50, 60), dtype=np.uint8)  # ZYX, not OME
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, stack, metadata={"axes": "ZYX"}, photometric="minisblack")
    with open_slide(path, z=2) as slide:
        assert slide.format == "tiff"
        assert slide.pixel_size_um is None
        assert slide.channel_names == ["channel_0"]
        np.testing.assert_array_equal(slide.read_level(0)[0], stack[2])
    with open_slide(path) as slide:  # z = 0 by default
        np.testing.assert_array_equal(slide.read_level(0)[0], stack[0])
    with pytest.raises(UsageError, match="z=5 is out of range"):
        open_slide(path, z=5)


# --------------------------------------------------------------------------------------
# OME-Zarr written with ome-zarr-py and by hand (bioformats2raw, NGFF 0.1)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_written_by_ome_zarr_py(tmp_path, version):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    image = _image(shape=(3, 256, 300))
    path = tmp_path / "slide.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    omero = {"channels": [{"label": n, "color": "FFFFFF", "window": {"min": 0, "max": 4000, "start": 0, "end": 4000}}
                          for n in NAMES]}
    write_image(image, group, scale_factors=[2], method=Methods.NEAREST,
                fmt=FormatV04() if version == "0.4" else FormatV05(), axes=["c", "y", "x"],
                axes_units={"y": "micrometer", "x": "micrometer"}, scale={"c": 1.0, "y": 0.4, "x": 0.4},
                storage_options={"chunks": (1, 64, 64)}, omero=omero)
    with open_slide(path) as slide:
        assert slide.format == "ome-zarr"
        assert slide.level_shapes == [(3, 256, 300), (3, 128, 150)]
        assert slide.channel_names == NAMES
        assert slide.pixel_size_um == pytest.approx((0.4, 0.4))
        stored = zarr.open_group(str(path), mode="r")
        level_paths = [d["path"] for d in (stored.attrs.get("ome") or dict(stored.attrs))["multiscales"][0]["datasets"]]
        _assert_regions_match(slide, [stored[p][:] for p in level_paths])
        np.testing.assert_array_equal(slide.read_level(0), image)


def test_bioformats2raw_layout_with_5d_series_and_ome_xml(tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    stack = _image(shape=(1, 2, 3, 64, 80))  # T, C, Z, Y, X
    root_path = tmp_path / "converted.ome.zarr"
    root = zarr.open_group(str(root_path), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    ome = root.create_group("OME")
    ome.attrs["series"] = ["0"]
    (root_path / "OME" / "METADATA.ome.xml").write_text(
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" '
        'DimensionOrder="XYZCT" Type="uint16" SizeX="80" SizeY="64" SizeZ="3" SizeC="2" SizeT="1" '
        'PhysicalSizeX="0.25" PhysicalSizeY="0.25"><Channel ID="Channel:0:0" Name="DAPI"/>'
        '<Channel ID="Channel:0:1" Name="GFAP"/></Pixels></Image></OME>'
    )
    write_image(stack, root.create_group("0"), scale_factors=[], fmt=FormatV04(), axes=["t", "c", "z", "y", "x"])
    with open_slide(root_path, z=1) as slide:
        assert slide.level_shapes == [(2, 64, 80)]
        assert slide.channel_names == ["DAPI", "GFAP"]  # from OME/METADATA.ome.xml (no omero labels)
        assert slide.pixel_size_um == pytest.approx((0.25, 0.25))  # NGFF scale has no unit: OME-XML says
        _assert_regions_match(slide, [stack[0, :, 1]])


def test_ngff_01_without_axes_is_tczyx(tmp_path):
    stack = _image(shape=(1, 2, 1, 40, 30))
    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    for level, data in enumerate((stack, stack[..., ::2, ::2])):
        group.create_array(str(level), data=np.ascontiguousarray(data), chunks=(1, 1, 1, 16, 16))
    group.attrs["multiscales"] = [{"version": "0.1", "datasets": [{"path": "0"}, {"path": "1"}]}]
    with open_slide(path) as slide:
        assert slide.level_shapes == [(2, 40, 30), (2, 20, 15)]
        assert slide.pixel_size_um is None
        _assert_regions_match(slide, [stack[0, :, 0], stack[0, :, 0, ::2, ::2]])


def test_our_writers_round_trip(tmp_path):
    image = _image(shape=(3, 700, 520))
    tiff = write_ome_tiff(tmp_path / "w.ome.tif", image, NAMES, (0.5, 0.5), tile=(128, 128))
    zarr_path = write_ome_zarr_image(tmp_path / "w.ome.zarr", image, NAMES, (0.5, 0.5), chunks=(1, 128, 128))
    zarr5 = write_ome_zarr_image(tmp_path / "w5.ome.zarr", image, NAMES, None, ngff_version="0.5", n_levels=2)
    assert not list(tmp_path.glob("*partial*"))
    expected_levels = [image]
    for _ in range(3):
        expected_levels.append(downsample_mean2(expected_levels[-1]))
    with open_slide(tiff) as slide:
        assert slide.level_shapes == [(3, 700, 520), (3, 350, 260), (3, 175, 130), (3, 88, 65)]
        assert not tifffile.TiffFile(tiff).is_bigtiff
        _assert_regions_match(slide, expected_levels)
    with open_slide(zarr_path) as slide:
        assert slide.channel_names == NAMES and slide.pixel_size_um == (0.5, 0.5)
        assert slide.level_shapes[:2] == [(3, 700, 520), (3, 350, 260)]
        np.testing.assert_array_equal(slide.read_level(0), image)
        level1 = slide.read_level(1).astype(float)
        assert np.abs(level1 - expected_levels[1]).max() <= 1.0  # local mean, rounding may differ
    with open_slide(zarr5) as slide:
        assert zarr.open_group(str(zarr5), mode="r").metadata.zarr_format == 3
        assert slide.n_levels == 2 and slide.pixel_size_um is None


def test_tile_function_writer_streams_and_builds_pyramid(tmp_path):
    def tile(channel, y0, x0, height, width):
        yy, xx = np.mgrid[y0 : y0 + height, x0 : x0 + width]
        return ((yy // 7 + xx // 5 + channel) % 200).astype(np.uint8)

    path = write_ome_tiff(tmp_path / "g.ome.btf", tile, ["DAPI", "B"], tile=(64, 64), n_levels=3,
                          shape=(2, 300, 250), dtype=np.uint8)
    full = np.stack([tile(c, 0, 0, 300, 250) for c in range(2)])
    with open_slide(path) as slide:
        assert tifffile.TiffFile(path).is_bigtiff
        levels = [full, downsample_mean2(full), downsample_mean2(downsample_mean2(full))]
        assert slide.level_shapes == [tuple(level.shape) for level in levels]
        _assert_regions_match(slide, levels)


# --------------------------------------------------------------------------------------
# Shared files written by Bio-Formats, bioformats2raw, SpatialData, ImageJ...
# --------------------------------------------------------------------------------------

# path -> (level shapes, dtype, channel names, pixel size (y, x) or None)
SHARED_EXPECTED = {
    "viv/multi-channel.ome.tif": ([(3, 167, 439)], "int8", ["channel_0", "channel_1", "channel_2"], None),
    "viv/multi-channel.tifffile-rewrite.ome.tif": ([(3, 167, 439)], "int8", ["channel_0", "channel_1", "channel_2"], None),
    "viv/bioformats2raw-layout1/data.zarr": ([(3, 167, 439), (3, 83, 219)], "int8", ["channel_0", "channel_1", "channel_2"], None),
    "viv/blobs_image_v04.ome.zarr": ([(3, 12, 12)], "float64", ["0", "1", "2"], None),
    "viv/blobs_image_v05.ome.zarr": ([(3, 12, 12)], "float64", ["0", "1", "2"], None),
    "galaxy-image-analysis/bfconvert/pyramid_4levels.ome.tiff": (
        [(4, 25, 26), (4, 12, 13), (4, 6, 6), (4, 3, 3)], "uint8", [f"channel_{i}" for i in range(4)], None),
    "galaxy-image-analysis/bfconvert/input.tiff": ([(1, 128, 128)], "uint8", ["channel_0"], None),
    "galaxy-image-analysis/multiseries.ome.tiff": ([(4, 5, 5)], "uint16", [f"channel_{i}" for i in range(4)], (0.65, 0.65)),
    "galaxy-image-analysis/bioformats2raw/xyz_8bit__mitotic_plate_calibrated.ome.zarr": (
        [(1, 263, 263), (1, 131, 131)], "uint8", ["Channel 0"], (0.0852, 0.0852)),
    "galaxy-image-analysis/bioformats2raw/xyz_8bit__mitotic_plate_calibrated.tiff": ([(1, 263, 263)], "uint8", ["channel_0"], None),
    "galaxy-image-analysis/bioformats2raw/camera.ome.zarr": (
        [(1, 480, 640), (1, 240, 320), (1, 120, 160)], "uint8", ["Channel 0"], None),
    "galaxy-image-analysis/bioformats2raw/coins.ome.zarr": (
        [(1, 480, 640), (1, 240, 320), (1, 120, 160)], "uint8", ["Channel 0"], None),
    "galaxy-image-analysis/ome-zarr-examples/image-02.zarr": ([(1, 200, 200)], "float64", ["channel_0"], (1.0, 1.0)),
    "galaxy-image-analysis/ome-zarr-examples/image-03.zarr": ([(1, 100, 100)], "float64", ["channel_0"], (1.0, 1.0)),
    "galaxy-image-analysis/ome-zarr-examples/image-04.zarr": ([(1, 64, 64), (1, 32, 32)], "float64", ["channel_0"], (1.0, 1.0)),
    **{f"viv/multifile/multifile-Z{z}.ome.tiff": ([(1, 24, 18)], "uint8", ["channel_0"], None) for z in range(1, 6)},
}


def _shared_entries(root: Path) -> list[Path]:
    """Every image file or store under ome-samples (what a user could point the reader at)."""
    entries = []
    for path in sorted(root.rglob("*")):
        if any(part.endswith((".zarr")) for part in path.relative_to(root).parts[:-1]):
            continue  # inside a store
        if path.is_dir() and path.name.endswith(".zarr"):
            entries.append(path)
        elif path.is_file() and path.suffix.lower() in (".tif", ".tiff", ".ome", ".btf"):
            entries.append(path)
    return entries


def test_every_shared_sample_opens_or_is_refused_in_one_line(ome_samples_dir):
    seen = set()
    for path in _shared_entries(ome_samples_dir):
        relative = path.relative_to(ome_samples_dir).as_posix()
        if relative == "viv/multifile/multifile.companion.ome":
            with pytest.raises(BadDataError) as refused:
                open_slide(path)
            assert "companion" in str(refused.value) and "\n" not in str(refused.value)
            seen.add(relative)
            continue
        assert relative in SHARED_EXPECTED, f"unexpected shared file {relative}"
        shapes, dtype, names, pixel_size = SHARED_EXPECTED[relative]
        with open_slide(path) as slide:
            assert slide.level_shapes == shapes, relative
            assert slide.dtype == np.dtype(dtype), relative
            assert slide.channel_names == names, relative
            if pixel_size is None:
                assert slide.pixel_size_um is None, relative
            else:
                assert slide.pixel_size_um == pytest.approx(pixel_size, rel=1e-3), relative
            levels = [slide.read_level(level) for level in range(slide.n_levels)]
            _assert_regions_match(slide, levels)
            blank = slide.is_blank()
            assert blank == relative.endswith("image-04.zarr"), relative  # no chunks: reads as zeros
        seen.add(relative)
    assert seen == set(SHARED_EXPECTED) | {"viv/multifile/multifile.companion.ome"}


def test_shared_multiseries_series_and_int8_values(ome_samples_dir):
    path = ome_samples_dir / "galaxy-image-analysis" / "multiseries.ome.tiff"
    with tifffile.TiffFile(path) as tif:
        expected = tif.series[5].asarray()
    with open_slide(path, series=5) as slide:
        np.testing.assert_array_equal(slide.read_level(0), expected)
    int8 = read_image(ome_samples_dir / "viv" / "multi-channel.ome.tif")
    assert int8.dtype == np.int8 and int8.min() == -1 and int8.max() == 96


# --------------------------------------------------------------------------------------
# Channels and percentiles
# --------------------------------------------------------------------------------------


def test_nuclear_channels_by_alias_and_request():
    names = ["cycle1_DAPI", "CD45", "Histone-H3", "GFAP", "DAPI_2"]
    assert select_nuclear_channels(names) == [0, 2, 4]
    assert select_nuclear_channels(names, "histone h3") == [2]
    assert select_nuclear_channels(names, "DAPI,Histone") == [0, 2]  # exact name first, else the alias group
    assert select_nuclear_channels(names, ["Hoechst"]) == [0, 4]  # alias of a DAPI channel
    assert select_nuclear_channels(["Hoechst 33342", "NeuN"], "dapi") == [0]
    assert select_nuclear_channels(["anything"]) == [0]  # a single channel is the nuclear stain
    assert select_nuclear_channels(names, "cd45") == [1]
    with pytest.raises(BadDataError) as missing:
        select_nuclear_channels(["CD3", "CD8", "PanCK"], path="slide.ome.tif")
    message = str(missing.value)
    assert "CD3, CD8, PanCK" in message and "--nuclear-channels" in message and message.startswith("slide.ome.tif")
    with pytest.raises(BadDataError, match="no channel matches 'Lamin'"):
        select_nuclear_channels(names, "Lamin")


def test_channel_percentiles_come_from_one_small_level_for_all_tiles(tmp_path):
    image = _image(shape=(2, 400, 400))
    path = write_ome_tiff(tmp_path / "p.ome.tif", image, ["DAPI", "X"], tile=(64, 64), n_levels=3)
    with open_slide(path) as slide:
        result = channel_percentiles(slide, [1, 0], low=2, high=98, min_pixels=20_000)
        source = slide.read_level(1, channels=[1, 0]).astype(np.float32)  # 200 x 200 >= 20 000 px; 100 x 100 is not
        assert result.shape == (2, 2) and result.dtype == np.float32
        np.testing.assert_allclose(result, np.percentile(source.reshape(2, -1), [2, 98], axis=1).T, rtol=1e-5)
        sampled = channel_percentiles(slide, [0], min_pixels=1, max_pixels=100)  # grid of windows instead
        assert sampled.shape == (1, 2) and sampled[0, 0] < sampled[0, 1]


# --------------------------------------------------------------------------------------
# Bad input: one-line errors with the documented exit code, library and CLI
# --------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, type, int]]:
    good = write_ome_tiff(tmp_path / "good.ome.tif", _image(shape=(2, 512, 512)), ["DAPI", "X"], tile=(64, 64))
    cases: dict[str, tuple[Path, type, int]] = {}
    cases["missing"] = (tmp_path / "absent.ome.tif", MissingInputError, ExitCode.MISSING_INPUT)
    folder = tmp_path / "folder.ome.tif"
    folder.mkdir()
    cases["directory"] = (folder, BadDataError, ExitCode.BAD_DATA)
    empty = tmp_path / "empty.ome.tif"
    empty.write_bytes(b"")
    cases["zero-byte"] = (empty, BadDataError, ExitCode.BAD_DATA)
    png = tmp_path / "image.ome.tif"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    cases["wrong-magic"] = (png, BadDataError, ExitCode.BAD_DATA)
    truncated = tmp_path / "truncated.ome.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    cases["truncated"] = (truncated, BadDataError, ExitCode.BAD_DATA)
    nan = tmp_path / "nan.ome.tif"
    tifffile.imwrite(nan, np.full((1, 64, 64), np.nan, np.float32), ome=True, metadata={"axes": "CYX"})
    cases["nan-only"] = (nan, BadDataError, ExitCode.BAD_DATA)
    zero_axis = tmp_path / "zero.ome.zarr"
    group = zarr.open_group(str(zero_axis), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, 0, 16), dtype="uint16", chunks=(1, 16, 16))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                   {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    cases["zero-sized-axis"] = (zero_axis, BadDataError, ExitCode.BAD_DATA)
    plain_zarr = tmp_path / "plain.zarr"
    zarr.open_group(str(plain_zarr), mode="w", zarr_format=3).create_array("x", shape=(4, 4), dtype="uint8")
    cases["zarr-without-ngff"] = (plain_zarr, BadDataError, ExitCode.BAD_DATA)
    return cases


BAD_CASES = ["missing", "directory", "zero-byte", "wrong-magic", "truncated", "nan-only", "zero-sized-axis",
             "zarr-without-ngff"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_refused_in_one_line_library_and_cli(tmp_path, run_cli, case):
    path, error_class, code = _bad_inputs(tmp_path)[case]
    with pytest.raises(error_class) as raised:
        open_slide(path)
    assert raised.value.exit_code == code
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    result = run_cli("info", path)
    assert result.exit_code == code
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nuclei-app: error: ") and str(path) in lines[0]


def test_truncated_zarr_chunk_is_bad_data_on_read(tmp_path):
    path = write_ome_zarr_image(tmp_path / "c.ome.zarr", _image(shape=(1, 128, 128)), ["DAPI"], n_levels=1,
                                chunks=(1, 64, 64))
    chunk = next(p for p in (path / "s0").rglob("*") if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[:10])
    with open_slide(path) as slide:
        with pytest.raises(BadDataError, match="truncated or corrupt"):
            slide.read_region(0, 0, 128, 128)


def test_info_cli_shows_levels_channels_and_nuclear_choice(tmp_path, run_cli):
    path = write_ome_tiff(tmp_path / "s.ome.tif", _image(shape=(3, 300, 300)), NAMES, (0.5, 0.5), tile=(128, 128))
    result = run_cli("info", path)
    assert result.exit_code == 0, result.stderr
    assert "level 1: C, Y, X = 3, 150, 150" in result.stdout
    assert "nuclear channels: DAPI, Histone H3" in result.stdout
    assert "pixel size (y, x): 0.5, 0.5 um" in result.stdout
    refused = run_cli("info", path, "--nuclear-channels", "CD3")
    assert refused.exit_code == ExitCode.BAD_DATA
    assert "DAPI, Histone H3, NeuN" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert run_cli("info", path, "--series", "3").exit_code == ExitCode.USAGE


def test_copied_store_is_independent_of_its_name(tmp_path):
    """A store is recognised by its metadata, not its extension."""
    source = write_ome_zarr_image(tmp_path / "a.ome.zarr", _image(shape=(1, 64, 64)), ["DAPI"], n_levels=1)
    renamed = tmp_path / "renamed_store"
    shutil.copytree(source, renamed)
    with open_slide(renamed) as slide:
        assert slide.format == "ome-zarr" and slide.shape == (1, 64, 64)
