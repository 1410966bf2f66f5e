# The Mailgate application image: one image for the web UI, the SMTP server, the Celery worker and
# beat (docker-compose.yml picks the command). Scanners, PostgreSQL and Redis are their own images.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=appliance.settings \
    DATA_DIR=/var/lib/mailgate

# Every runtime dependency has a wheel for 3.11 (psycopg[binary] brings its own libpq) but python-ldap, which is
# built against OpenLDAP's client library: the compiler is there for that step only, the libraries stay. The
# lock pins every transitive dependency and the hash of each file (make lock): the image gets what CI tested.
WORKDIR /app
COPY requirements.lock ./
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libldap2-dev libsasl2-dev \
    && pip install --require-hashes -r requirements.lock \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The application only, by name: no virtualenv, data, tests or VCS in the image.
COPY manage.py ./
COPY appliance ./appliance
COPY gateway ./gateway
COPY quarantine ./quarantine
COPY console ./console
COPY reports ./reports
COPY digests ./digests
COPY templates ./templates
COPY static ./static

# Static files are collected into the image (STATIC_ROOT is $DATA_DIR/static, served by whitenoise);
# the compose file's migrate service collects them again into the data volume on every upgrade.
# The key below exists only for this build step; the containers get theirs from the environment.
RUN useradd --system --uid 10001 --home-dir "$DATA_DIR" --shell /usr/sbin/nologin mailgate \
    && install -d -m 0700 -o mailgate -g mailgate "$DATA_DIR" \
    && SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput -v0 \
    && chown -R mailgate:mailgate "$DATA_DIR" \
    && python -m compileall -q /app

USER mailgate
VOLUME ["/var/lib/mailgate"]
EXPOSE 8000 25 465 587
CMD ["gunicorn", "appliance.wsgi", "-b", "0.0.0.0:8000"]
