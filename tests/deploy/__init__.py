"""Helpers of tests/test_deploy.py: reading and rendering deploy/."""
