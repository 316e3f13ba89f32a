"""Where cohort files live and how they are written.

``paths``   the ``DATA_DIR`` layout (the only place that spells it), :func:`data_path`
            (refuses paths escaping ``DATA_DIR``), :class:`StorageError`;
``atomic``  :func:`output_folders` (stage outputs rebuilt as whole folders); single-file
            and folder replacement come from :mod:`pipeline.atomic`;
``mirror``  the optional shared storage (S3 or another path) the local folders mirror.
"""
