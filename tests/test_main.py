from fastcache.__main__ import main


def test_main_job_times_both_and_writes_the_image(tmp_path):
    out = tmp_path / "image.png"
    result = main(["--steps", "4", "--repeat", "1", "--variant", "fastcache-eager", "--output", str(out),
                   "--device", "cpu"])
    assert out.stat().st_size > 0
    assert result["baseline_s"] > 0 and result["fastcache_s"] > 0
    assert 0 < result["rel_l2_image"] < 0.5


def test_main_job_on_a_video_preset_writes_an_mp4(tmp_path):
    import av

    out = tmp_path / "video.mp4"
    result = main(["--preset", "tiny-animatediff", "--steps", "3", "--repeat", "1", "--variant", "fastcache-eager",
                   "--output", str(out), "--device", "cpu", "--interval", "2"])
    with av.open(str(out)) as container:
        assert len(list(container.decode(video=0))) == 4  # the preset's frames
    assert result["baseline_s"] > 0 and result["fastcache_s"] > 0 and 0 < result["rel_l2_image"] < 0.5


def test_a_video_preset_refuses_an_image_output(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tiny-svd", "--output", str(tmp_path / "video.png")])
    assert exit_info.value.code == 2
    assert "a video is written as .mp4 or .webp" in capsys.readouterr().err
