"""The shared contract applied to the in-test sources (and so to any user-defined source)."""

from retrieval.testing.contract import SourceContract
from retrieval.types import Request
from sources.base import SourceContext
from tests.toy_sources import CatalogSource, HistoryEcho, ListParams, ListSource


class TestListSource(SourceContract):
    def make_source(self, tmp_path):
        return ListSource("toy", ListParams(items=list(range(100))), SourceContext())

    def known_request(self):
        return Request(user_id=1)


class TestHistoryEcho(SourceContract):
    def make_source(self, tmp_path):
        return HistoryEcho("echo", HistoryEcho.Params(), SourceContext())

    def known_request(self):
        return Request(user_id=1, history=(1, 2, 3), context={"country": "de"})


class TestCatalogSource(SourceContract):
    def make_source(self, tmp_path):
        return CatalogSource("cat", CatalogSource.Params(n=100), SourceContext())

    def known_request(self):
        return Request()
