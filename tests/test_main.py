from fastcache.__main__ import main


def test_main_job_times_both_and_writes_the_image(tmp_path):
    out = tmp_path / "image.png"
    result = main(["--steps", "4", "--repeat", "1", "--variant", "fastcache-eager", "--output", str(out),
                   "--device", "cpu"])
    assert out.stat().st_size > 0
    assert result["baseline_s"] > 0 and result["fastcache_s"] > 0
    assert 0 < result["rel_l2_image"] < 0.5
