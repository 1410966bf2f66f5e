#!/bin/sh
# Start spamd in the foreground for docker-compose.yml: refresh the rules with sa-update first
# (exit code 1 means "no newer rules", fine), then serve the compose network on port 783.
set -eu

install -d -o debian-spamd -g debian-spamd -m 0770 /var/lib/spamassassin/bayes
chown -R debian-spamd:debian-spamd /var/lib/spamassassin

if [ "${SA_UPDATE:-yes}" = yes ]; then
    code=0
    su debian-spamd -s /bin/sh -c 'sa-update -v' || code=$?
    case $code in
        0) echo "sa-update: new rules" ;;
        1) echo "sa-update: rules are current" ;;
        *) echo "sa-update failed ($code): using the rules we have" ;;
    esac
fi

# -x: one site-wide configuration and Bayes database (bayes_path in local.cf); --allow-tell: the
# quarantine teaches Bayes through TELL. Only the private compose network may connect.
exec spamd --listen 0.0.0.0:783 --allowed-ips="${SPAMD_ALLOWED_IPS:-127.0.0.1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16}" \
    -u debian-spamd -g debian-spamd -x --allow-tell \
    --min-children "${SPAMD_MIN_CHILDREN:-2}" --max-children "${SPAMD_MAX_CHILDREN:-5}" \
    -s stderr
