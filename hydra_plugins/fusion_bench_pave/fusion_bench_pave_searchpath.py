"""Hydra search-path plugin: makes ``fusion_bench method=pave_ties ...`` find this package's yaml."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FusionBenchPaveSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Hydra imports this module in every app of the environment; repair fusion_bench's
        # transformers-5 import here, before any taskpool is instantiated.
        from fusion_bench_pave.compat import patch_transformers_for_fusion_bench

        patch_transformers_for_fusion_bench()
        search_path.append(provider="fusion-bench-pave", path="pkg://fusion_bench_pave.config")
