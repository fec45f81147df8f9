"""Integrations of the UniSD losses with other training libraries.

Each integration is a submodule imported on demand (``import unisd_fast.integrations.trl``);
importing ``unisd_fast`` or this package imports none of those libraries. See docs/trl.md.
"""
