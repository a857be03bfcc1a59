"""Names in errors: a count and at most five examples, bounded in characters, the same every time."""

from fastcache.errors_text import EXAMPLE_CHARS, LINE_CHARS, count, examples, listing, one_line


def test_a_short_list_is_shown_whole_and_a_long_one_as_a_count_and_examples():
    assert listing(["b", "a", "c"], "adapter") == "3 adapters (a, b, c)"
    assert listing(["x"], "module") == "1 module (x)"
    modules = [f"down_blocks.{i}.attn" for i in range(90)]
    text = listing(modules, "module")
    assert text.startswith("90 modules (e.g. down_blocks.0.attn, down_blocks.1.attn, ") and text.count(",") == 4
    assert listing(modules, "module") == listing(reversed(modules), "module")  # sorted: the same every time


def test_long_names_take_fewer_examples_and_one_is_always_shown():
    long = [f"unet.down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_out.0" for i in range(9)]
    shown = examples(long)
    assert shown.startswith("(e.g. ") and len(shown) <= EXAMPLE_CHARS + 10 and shown.count(",") < 4
    assert examples(["y" * 500]).startswith("(yyy") and len(examples(["y" * 500])) <= EXAMPLE_CHARS + 4


def test_counts_and_order():
    assert count(["a", "a", "b"], "name") == "2 names" and count([], "key") == "0 keys"
    assert count(["a", "b"], "entry", "entries") == "2 entries"
    assert examples(["interval", "branch", "schedule"], ordered=True) == "(interval, branch, schedule)"


def test_one_line_collapses_and_bounds_a_message_from_elsewhere():
    assert one_line("Target modules {a,\n b}\tnot found") == "Target modules {a, b} not found"
    cut = one_line("x" * 10_000)
    assert len(cut) == LINE_CHARS and cut.endswith("…")
