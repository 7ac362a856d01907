
/*
 * Copyright (C) ratepool authors
 */


/* gmtime_r() */
#define _POSIX_C_SOURCE  200809L

#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "ratepool_sigv4.h"


/* a canonical request is a few headers and hashes: this is plenty */
#define RATEPOOL_SIGV4_CANONICAL_MAX  8192     /* STS tokens run to 2 KB+ */


static void ratepool_sigv4_hex(const unsigned char *digest, size_t len,
    char *out);
static void ratepool_sigv4_hmac(const void *key, size_t key_len,
    const void *data, size_t data_len, unsigned char *out);
static size_t ratepool_sigv4_signed_headers(const ratepool_sigv4_t *s,
    char *out, size_t size);


void
ratepool_sigv4_date(time_t t, char *out)
{
    int        i, d, v[6], width[6];
    char      *p;
    struct tm  tm;

    gmtime_r(&t, &tm);

    v[0] = tm.tm_year + 1900;
    v[1] = tm.tm_mon + 1;
    v[2] = tm.tm_mday;
    v[3] = tm.tm_hour;
    v[4] = tm.tm_min;
    v[5] = tm.tm_sec;

    for (i = 0; i < 6; i++) {
        width[i] = i ? 2 : 4;
    }

    p = out;

    for (i = 0; i < 6; i++) {
        if (i == 3) {
            *p++ = 'T';
        }

        p += width[i];

        for (d = 1; d <= width[i]; d++) {
            p[-d] = (char) ('0' + v[i] % 10);
            v[i] /= 10;
        }
    }

    *p++ = 'Z';
    *p = '\0';
}


static void
ratepool_sigv4_hex(const unsigned char *digest, size_t len, char *out)
{
    static const char  digits[] = "0123456789abcdef";

    size_t  i;

    for (i = 0; i < len; i++) {
        out[2 * i] = digits[digest[i] >> 4];
        out[2 * i + 1] = digits[digest[i] & 0xf];
    }

    out[2 * len] = '\0';
}


void
ratepool_sigv4_sha256_hex(const void *data, size_t len, char *out)
{
    unsigned char  digest[SHA256_DIGEST_LENGTH];

    SHA256(data, len, digest);
    ratepool_sigv4_hex(digest, sizeof(digest), out);
}


static void
ratepool_sigv4_hmac(const void *key, size_t key_len, const void *data,
    size_t data_len, unsigned char *out)
{
    unsigned int  n;

    n = SHA256_DIGEST_LENGTH;
    HMAC(EVP_sha256(), key, (int) key_len, data, data_len, out, &n);
}


/* "host;x-amz-date": the signed headers' names, joined */

static size_t
ratepool_sigv4_signed_headers(const ratepool_sigv4_t *s, char *out,
    size_t size)
{
    size_t  i, len;

    len = 0;

    for (i = 0; i < s->nheaders; i++) {
        if (len + s->headers[i].name_len + 2 > size) {
            return 0;
        }

        if (i) {
            out[len++] = ';';
        }

        memcpy(out + len, s->headers[i].name, s->headers[i].name_len);
        len += s->headers[i].name_len;
    }

    return len;
}


int
ratepool_sigv4_sign(const ratepool_sigv4_t *s, char *out)
{
    int            n;
    char           canonical[RATEPOOL_SIGV4_CANONICAL_MAX],
                   hash[RATEPOOL_SIGV4_HEX_LEN + 1],
                   to_sign[512], secret[128], names[512];
    size_t         i, len, names_len;
    unsigned char  key[SHA256_DIGEST_LENGTH], sig[SHA256_DIGEST_LENGTH];

    names_len = ratepool_sigv4_signed_headers(s, names, sizeof(names));

    if (names_len == 0 || s->secret_len + 4 > sizeof(secret)) {
        return -1;
    }

    /* method, path, query, "name:value" lines, names, body hash */

    n = snprintf(canonical, sizeof(canonical), "%s\n%.*s\n%.*s\n", s->method,
                 (int) s->path_len, s->path, (int) s->query_len, s->query);
    if (n < 0 || (size_t) n >= sizeof(canonical)) {
        return -1;
    }

    len = (size_t) n;

    for (i = 0; i < s->nheaders; i++) {
        n = snprintf(canonical + len, sizeof(canonical) - len, "%.*s:%.*s\n",
                     (int) s->headers[i].name_len, s->headers[i].name,
                     (int) s->headers[i].value_len, s->headers[i].value);
        if (n < 0 || (size_t) n >= sizeof(canonical) - len) {
            return -1;
        }

        len += (size_t) n;
    }

    n = snprintf(canonical + len, sizeof(canonical) - len, "\n%.*s\n%s",
                 (int) names_len, names, s->payload_hex);
    if (n < 0 || (size_t) n >= sizeof(canonical) - len) {
        return -1;
    }

    len += (size_t) n;

    ratepool_sigv4_sha256_hex(canonical, len, hash);

    n = snprintf(to_sign, sizeof(to_sign),
                 "AWS4-HMAC-SHA256\n%.16s\n%.8s/%.*s/%s/aws4_request\n%s",
                 s->date, s->date, (int) s->region_len, s->region,
                 s->service, hash);
    if (n < 0 || (size_t) n >= sizeof(to_sign)) {
        return -1;
    }

    /* the signing key: the secret, then the day, region and service */

    memcpy(secret, "AWS4", 4);
    memcpy(secret + 4, s->secret, s->secret_len);

    ratepool_sigv4_hmac(secret, s->secret_len + 4, s->date, 8, key);
    ratepool_sigv4_hmac(key, sizeof(key), s->region, s->region_len, key);
    ratepool_sigv4_hmac(key, sizeof(key), s->service, strlen(s->service),
                        key);
    ratepool_sigv4_hmac(key, sizeof(key), "aws4_request", 12, key);

    ratepool_sigv4_hmac(key, sizeof(key), to_sign, (size_t) n, sig);
    ratepool_sigv4_hex(sig, sizeof(sig), out);

    /* no copy of the secret outlives the call */
    OPENSSL_cleanse(secret, sizeof(secret));
    OPENSSL_cleanse(key, sizeof(key));

    return 0;
}


size_t
ratepool_sigv4_authorization(const ratepool_sigv4_t *s,
    const char *access_key, size_t access_key_len, char *out, size_t size)
{
    int     n;
    char    sig[RATEPOOL_SIGV4_HEX_LEN + 1], names[512];
    size_t  names_len;

    names_len = ratepool_sigv4_signed_headers(s, names, sizeof(names));

    if (names_len == 0 || ratepool_sigv4_sign(s, sig) != 0) {
        return 0;
    }

    n = snprintf(out, size, "AWS4-HMAC-SHA256 Credential=%.*s/%.8s/%.*s/%s/"
                 "aws4_request, SignedHeaders=%.*s, Signature=%s",
                 (int) access_key_len, access_key, s->date,
                 (int) s->region_len, s->region, s->service,
                 (int) names_len, names, sig);

    if (n < 0 || (size_t) n >= size) {
        return 0;
    }

    return (size_t) n;
}
