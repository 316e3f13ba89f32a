"""Test data builders: ``dicom_cohorts`` (synthetic DICOM cohorts with fake identities,
as uploads) and ``studies`` (cohorts of render PNGs, researchers, studies, answers)."""
