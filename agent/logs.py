"""Structured logs: one JSON object per line on stderr (journald keeps it)."""

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.LogRecord('', 0, '', 0, '', (), None)))


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            'ts': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(
                record.created)) + '.%03dZ' % record.msecs,
            'level': record.levelname.lower(),
            'logger': record.name,
            'message': record.getMessage(),
        }
        if record.name == 'agent.events':
            try:
                entry.update(json.loads(record.getMessage()))
            except ValueError:
                pass
        entry.update({k: v for k, v in vars(record).items()
                      if k not in _STANDARD and not k.startswith('_')})
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(verbose=False):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ('urllib3', 'oslo_concurrency', 'os_brick', 'stevedore',
                  'oslo_service'):
        logging.getLogger(noisy).setLevel(logging.WARNING)
