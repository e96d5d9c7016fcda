"""Unit tests of the checkers' own parsing (run by .ci/deploy-checks): a checker that misreads
an expression would pass a dashboard it should fail."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashboard_check import unknown_fields  # noqa: E402
from live_check import has_data, metric_names, substitute  # noqa: E402


class MetricNames(unittest.TestCase):
    def test_selectors_functions_and_grouping(self):
        expr = (
            "histogram_quantile(0.95, sum by (le, route) (rate("
            'atlas_http_request_duration_seconds_bucket{job=~"$job", route!~"/metrics|/healthz"}'
            "[5m])))"
        )
        self.assertEqual(metric_names(expr), {"atlas_http_request_duration_seconds_bucket"})

    def test_binary_operators_and_matching(self):
        expr = (
            "sum by (job) (rate(a_total[5m])) / on (job) group_left (kind) b_bytes"
            " > bool 1e3 and c unless d offset 5m or -Inf < e"
        )
        self.assertEqual(metric_names(expr), {"a_total", "b_bytes", "c", "d", "e"})

    def test_strings_and_label_values_are_not_metrics(self):
        expr = 'count by (state) (atlas_jobs{state="failed", reason=~"queue_full|x_total"})'
        self.assertEqual(metric_names(expr), {"atlas_jobs"})

    def test_a_misspelt_metric_is_reported(self):
        self.assertIn("atlas_cache_hit_total", metric_names("rate(atlas_cache_hit_total[1m])"))


class Substitute(unittest.TestCase):
    def test_grafana_variables(self):
        got = substitute('rate(x{job=~"$job", instance=~"${instance}"}[$__rate_interval])')
        self.assertEqual(got, 'rate(x{job=~"atlas-serve", instance=~".*"}[1m])')

    def test_unknown_variable_is_an_error(self):
        with self.assertRaises(ValueError):
            substitute('x{route="$route"}')


class HasData(unittest.TestCase):
    def test_nan_only_is_no_data(self):
        self.assertFalse(has_data([{"value": [0, "NaN"]}]))
        self.assertFalse(has_data([]))
        self.assertTrue(has_data([{"value": [0, "NaN"]}, {"value": [0, "0.5"]}]))


class UnknownFields(unittest.TestCase):
    def test_lost_keys_and_items_are_reported(self):
        data = {"a": 1, "b": {"c": 2, "d": 3}, "l": [{"x": 1}, {"y": 2}]}
        back = {"a": 1, "b": {"c": 2}, "l": [{"x": 1}, {}]}
        self.assertEqual(unknown_fields(data, back), ["/b/d", "/l[1]/y"])
        self.assertEqual(
            unknown_fields({"l": [1, 2]}, {"l": [1]}), ["/l: 2 items, 1 after the round trip"]
        )


if __name__ == "__main__":
    unittest.main()
