"""Blinded human re-identification studies (issue #6): design, rater flow, report, exports."""
