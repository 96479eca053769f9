"""What a user writes, validated before any work and without torch: a trial config (`trial`), a
search space (`space`), the l values of an irrep set (`lvalues`), the QM9 targets (`targets`) and
what a configuration is, the thing seeds replicate (`configuration`)."""
