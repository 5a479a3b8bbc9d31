"""Hydra search-path plugin: makes ``fusion_bench method=pave_ties ...`` find this package's yaml."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FusionBenchPaveSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Hydra calls this before composing any config: fusion_bench_pave.plugin repairs
        # fusion_bench's transformers-5 import and registers the resolvers our yaml uses.
        import fusion_bench_pave.plugin  # noqa: F401

        search_path.append(provider="fusion-bench-pave", path="pkg://fusion_bench_pave.config")
