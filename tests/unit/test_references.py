"""The generated references in docs/ match the code they come from."""

import os

from agent import config, operations
from tests.conftest import REPO


def _committed(name):
    with open(os.path.join(REPO, 'docs', name)) as f:
        return f.read()


def test_api_reference_is_up_to_date():
    assert _committed('api.md') == operations.reference(), (
        'docs/api.md is stale: run python -m agent.operations > docs/api.md')


def test_configuration_reference_is_up_to_date():
    assert _committed('configuration.md') == config.reference(), (
        'docs/configuration.md is stale: run python -m agent.config > '
        'docs/configuration.md')


def test_docs_stay_inside_the_repository():
    """Every relative link in docs/ and the README leads to a file of the
    repository."""
    import re
    pages = [os.path.join(REPO, 'README.md')] + [
        os.path.join(REPO, 'docs', n) for n in os.listdir(
            os.path.join(REPO, 'docs')) if n.endswith('.md')]
    for page in pages:
        with open(page) as f:
            text = f.read()
        for target in re.findall(r'\]\(([^)#]+)', text):
            if '://' in target:
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page),
                                                 target))
            assert path.startswith(REPO + os.sep), (page, target)
            assert os.path.exists(path), (page, target)
