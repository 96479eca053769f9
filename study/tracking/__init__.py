"""MLflow: tracking URIs, experiments, runs and their tags (`store`), the journal that keeps a trial's
writes through a tracking outage and syncs them later (`journal`), and a trial's model as an
MLflow Model (`logged_model`)."""
