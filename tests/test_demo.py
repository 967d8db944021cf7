"""The demo's report table."""

from imprag_ray.demo import markdown_table


def test_markdown_table_has_a_row_per_system_and_em_recall_per_format():
    row = {"em": 0.5, "recall@1": 0.25, "recall@10": None}
    table = markdown_table({"closed-book": {"qa": row, "fact_check": row}, "ImpRAG": {"qa": row, "fact_check": row}},
                           (1, 10))
    lines = table.splitlines()
    assert lines[0] == ("| system | qa EM | qa R@1 | qa R@10 | fact_check EM | fact_check R@1 | fact_check R@10 |")
    assert lines[2] == "| closed-book | 50.0 | 25.0 | - | 50.0 | 25.0 | - |"
    assert len(lines) == 4
