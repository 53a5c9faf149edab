#!/bin/sh
# The pipeline's Kafka users (SCRAM-SHA-512) and ACLs on docker-compose.yml's Kafka, run once by the
# kafka-users service. Passwords come from BROKER_PW_<USER> (docker compose reads them from the shell
# or .env); the admin logs in with PLAIN on the INTERNAL listener (9094). Every principal gets only
# what it needs: the telescope writes frames; each stage reads its input, writes its outputs and its
# dead letters in transactions of its own id, and reads and writes its progress topic; a subscriber
# reads alert topics; the registry its topic. tests/test_deploy.py checks these lines against
# streams/stages.py.
set -eu
K=/opt/kafka/bin
B=kafka:9094
umask 077
cat > /tmp/admin.properties <<PROPS
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$BROKER_PW_ADMIN";
PROPS

user() {  # user NAME: SCRAM-SHA-512 credentials from $BROKER_PW_<NAME>
  pw=$(printenv "BROKER_PW_$(echo "$1" | tr '[:lower:]' '[:upper:]')")
  "$K/kafka-configs.sh" --bootstrap-server "$B" --command-config /tmp/admin.properties --alter \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$pw]" --entity-type users --entity-name "$1" >/dev/null
}

allow() {  # allow USER OPERATION RESOURCE NAME [prefixed]
  "$K/kafka-acls.sh" --bootstrap-server "$B" --command-config /tmp/admin.properties --add \
    --allow-principal "User:$1" --operation "$2" "--$3" "$4" --resource-pattern-type "${5:-literal}" >/dev/null
}

stage() {  # stage NAME INPUT OUTPUT...: read INPUT, write the outputs, its group and transactional ids
  name=$1 input=$2
  shift 2
  user "$name"
  allow "$name" Read topic "$input"
  allow "$name" Describe topic "$input"
  for out in "$@" "dlq.$name"; do
    allow "$name" Write topic "$out" "$(case $out in *.) echo prefixed ;; *) echo literal ;; esac)"
    allow "$name" Describe topic "$out" "$(case $out in *.) echo prefixed ;; *) echo literal ;; esac)"
  done
  allow "$name" Read group "broker.$name" prefixed
  if [ "$name" != archive ]; then  # the duplicate guard's state (streams/lineage.py)
    allow "$name" Read topic "progress.$name"
    allow "$name" Write topic "progress.$name"
    allow "$name" Describe topic "progress.$name"
  fi
  allow "$name" Write transactional-id "broker.$name." prefixed
  allow "$name" Describe transactional-id "broker.$name." prefixed
}

user telescope
allow telescope Write topic frames
allow telescope Describe topic frames
allow telescope Read topic followup
allow telescope Describe topic followup
allow telescope Read group broker.followup prefixed
allow telescope Write topic dlq.followup
allow telescope Describe topic dlq.followup
stage ingest frames ingested
stage subtract ingested candidates
stage classify candidates classified
stage score classified scored
stage alert scored alerts alerts. alerts-rubin alerts-fink followup
stage archive alerts
user subscriber
allow subscriber Read topic alerts prefixed
allow subscriber Describe topic alerts prefixed
allow subscriber Read group broker.subscriber- prefixed
allow subscriber Read group subscriber- prefixed
# the portal's live stream (docker-compose.yml runs the portal as subscriber; app id portal)
allow subscriber Read group portal.subscriber- prefixed
user registry
allow registry All topic _schemas
allow registry Read group schema-registry prefixed
allow registry DescribeConfigs topic _schemas
echo "Kafka users and ACLs in place"
