
/*
 * Copyright (C) ratepool authors
 */


#include <stdio.h>
#include <string.h>

#include "ratepool_jwt.h"


size_t
ratepool_base64url(const unsigned char *in, size_t len, unsigned char *out)
{
    size_t    i, n;
    uint32_t  v;

    static const char  digits[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    n = 0;

    for (i = 0; i + 2 < len; i += 3) {
        v = ((uint32_t) in[i] << 16) | ((uint32_t) in[i + 1] << 8) | in[i + 2];
        out[n++] = digits[(v >> 18) & 63];
        out[n++] = digits[(v >> 12) & 63];
        out[n++] = digits[(v >> 6) & 63];
        out[n++] = digits[v & 63];
    }

    if (len - i == 1) {
        v = (uint32_t) in[i] << 16;
        out[n++] = digits[(v >> 18) & 63];
        out[n++] = digits[(v >> 12) & 63];

    } else if (len - i == 2) {
        v = ((uint32_t) in[i] << 16) | ((uint32_t) in[i + 1] << 8);
        out[n++] = digits[(v >> 18) & 63];
        out[n++] = digits[(v >> 12) & 63];
        out[n++] = digits[(v >> 6) & 63];
    }

    return n;
}


size_t
ratepool_jwt_sign(const ratepool_jwt_t *jwt, unsigned char *out, size_t size)
{
    int             n;
    size_t          len, sig_len;
    unsigned char   json[1024], sig[1024];
    EVP_MD_CTX     *md;

    n = snprintf((char *) json, sizeof(json),
                 "{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"%.*s\"}",
                 (int) jwt->kid_len, jwt->kid);
    if (n < 0 || (size_t) n >= sizeof(json)
        || size < RATEPOOL_B64URL_LEN((size_t) n) + 1)
    {
        return 0;
    }

    len = ratepool_base64url(json, (size_t) n, out);
    out[len++] = '.';

    n = snprintf((char *) json, sizeof(json),
                 "{\"iss\":\"%.*s\",\"scope\":\"%s\",\"aud\":\"%.*s\","
                 "\"iat\":%lld,\"exp\":%lld}",
                 (int) jwt->email_len, jwt->email, jwt->scope,
                 (int) jwt->aud_len, jwt->aud, (long long) jwt->now,
                 (long long) (jwt->now + RATEPOOL_JWT_LIFETIME));
    if (n < 0 || (size_t) n >= sizeof(json)
        || size - len < RATEPOOL_B64URL_LEN((size_t) n) + 1)
    {
        return 0;
    }

    len += ratepool_base64url(json, (size_t) n, out + len);

    /* RS256: RSASSA-PKCS1-v1_5 with SHA-256, over "header.claims" */

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return 0;
    }

    sig_len = sizeof(sig);

    if (EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, jwt->key) != 1
        || EVP_DigestSign(md, sig, &sig_len, out, len) != 1)
    {
        EVP_MD_CTX_free(md);
        return 0;
    }

    EVP_MD_CTX_free(md);

    if (size - len < RATEPOOL_B64URL_LEN(sig_len) + 1) {
        return 0;
    }

    out[len++] = '.';
    len += ratepool_base64url(sig, sig_len, out + len);

    return len;
}
