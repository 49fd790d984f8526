"""A slide far larger than the memory allowed is written tile by tile and read region by region.

The slide is 4 x 20000 x 20000 uint16 (3.2 GB as an array), mostly background so it
compresses to a few MB. Writing and reading run in a child process whose address space
is capped below the full array size; the child reports its peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

FULL_ARRAY_BYTES = 4 * 20000 * 20000 * 2

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, tracemalloc
    import numpy as np

    cap = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # the full array could never be allocated

    from nuclei_app.io.slides import open_slide
    from nuclei_app.io.ome_tiff import write_ome_tiff

    SIZE, BOX = 20000, (9000, 11000)

    def expected(channel, y0, x0, height, width):
        # background everywhere except one 2000 x 2000 box of a per-channel ramp
        out = np.zeros((height, width), np.uint16)
        ys = slice(max(y0, BOX[0]), min(y0 + height, BOX[1]))
        xs = slice(max(x0, BOX[0]), min(x0 + width, BOX[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            yy, xx = np.mgrid[ys, xs]
            out[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = (yy + xx + 7 * channel) % 251 + 1
        return out

    def peak_rss_bytes():
        # VmHWM belongs to this process image; ru_maxrss would carry the forking parent's peak over exec.
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path = sys.argv[1]
    tracemalloc.start()
    start = time.perf_counter()
    write_ome_tiff(path, expected, ["DAPI", "Histone", "NeuN", "GFAP"], (0.5, 0.5), tile=(1024, 1024),
                   n_levels=2, shape=(4, SIZE, SIZE), dtype=np.uint16)
    write_seconds = time.perf_counter() - start
    write_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()

    regions = [(0, 0, 512, 512), (8900, 8950, 1200, 900), (10500, 10900, 700, 700), (19800, 19700, 512, 512)]
    checks = []
    with open_slide(path) as slide:
        for y0, x0, height, width in regions:
            got = slide.read_region(y0, x0, height, width, level=0, channels=[0, 3])
            want = np.stack([expected(c, y0, x0, min(height, SIZE - y0), min(width, SIZE - x0)) for c in (0, 3)])
            checks.append(bool(np.array_equal(got, want)))
        low = slide.read_region(4400, 4400, 1200, 1200, level=1, channels=[1])
        checks.append(bool(low[0, 100:1100, 100:1100].min() > 0 and low[0, :50, :50].max() == 0))
        info = dict(shape=list(slide.shape), levels=[list(s) for s in slide.level_shapes],
                    names=slide.channel_names, pixel_size=list(slide.pixel_size_um))
    read_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps(dict(info, checks=checks, write_peak=write_peak, read_peak=read_peak,
                          max_rss=peak_rss_bytes(),
                          write_seconds=write_seconds)))
    """
)


@pytest.mark.slow
def test_huge_slide_written_tile_by_tile_and_read_by_region_under_memory_cap(tmp_path):
    path = tmp_path / "huge.ome.btf"
    cap = 2 * 1024**3  # 2 GiB address space: less than the 3.2 GB array
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4, 20000, 20000]
    assert result["levels"] == [[4, 20000, 20000], [4, 10000, 10000]]
    assert result["names"] == ["DAPI", "Histone", "NeuN", "GFAP"]
    assert result["pixel_size"] == [0.5, 0.5]
    assert all(result["checks"]), result["checks"]
    assert path.stat().st_size < 50 * 1024**2  # background compresses: the file is small
    # peak Python allocations while writing and while reading stay far below the array size
    assert result["write_peak"] < 300 * 1024**2, result
    assert result["read_peak"] < 300 * 1024**2, result
    assert result["max_rss"] < 600 * 1024**2 < FULL_ARRAY_BYTES, result
