#!/bin/sh
# The init job of deploy/docker-compose.yml, run before the API and the worker; safe to run again.
#   1. Kafka topics (events, decisions, dead letters), with the partition counts of the settings.
#   2. Database migrations.
#   3. Models: trained on the built-in synthetic data set when no champions are registered (~1 min).
set -eu

status=0
python - <<'EOF' || status=$?
import sys

from decision_platform.config import get_settings
from decision_platform.models.registry import ModelRegistry
from decision_platform.storage.database import make_engine, migrate
from decision_platform.storage.repository import Repository

settings = get_settings()
if settings.kafka_bootstrap_servers:
    from decision_platform.events.kafka import ensure_topics  # imports the engine: only when needed

    ensure_topics(settings, timeout_s=30)
    print("topics ready:", settings.kafka_events_topic, settings.kafka_decisions_topic, settings.kafka_dlq_topic)
engine = make_engine(settings.database_url, settings.database_schema)
migrate(engine, settings.database_schema)
print("database migrated")
# Exit code 3, not 1: an error anywhere above must fail the job, not be taken for "no models".
sys.exit(0 if ModelRegistry(Repository(engine), settings.model_dir).has_champions() else 3)
EOF

case "$status" in
    0) echo "models: champions registered, nothing to train" ;;
    3)
        echo "models: none registered, training on the synthetic data set"
        decision-platform train
        ;;
    *) exit "$status" ;;
esac
