"""Study-level statistics, per configuration with seeds as replicates: configurations and their
baselines (`configurations`), which trials survived (`survival`), factorial effects (`factorial`)
and the other ablation designs (`ablation`), score-error correlations (`correlate`), and the
seeded simulations that check their error rates (`simulation`)."""
