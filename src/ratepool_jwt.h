
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_JWT_H_INCLUDED_
#define _RATEPOOL_JWT_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>


/*
 * The assertion a Google service account trades for an access token: a
 * JWT signed with RS256 by the account's private key, {"alg":"RS256",
 * "typ":"JWT","kid":...} and claims iss (the account's email), scope,
 * aud (the token endpoint), iat and exp (an hour later).
 */

#define RATEPOOL_JWT_LIFETIME   3600

typedef struct {
    EVP_PKEY       *key;
    const char     *kid;
    size_t          kid_len;
    const char     *email;
    size_t          email_len;
    const char     *aud;
    size_t          aud_len;
    const char     *scope;
    int64_t         now;
} ratepool_jwt_t;


/* base64url, unpadded, of len bytes: out has RATEPOOL_B64URL_LEN(len) */
#define RATEPOOL_B64URL_LEN(len)  (((len) + 2) / 3 * 4)

size_t ratepool_base64url(const unsigned char *in, size_t len,
    unsigned char *out);

/* the JWT into out (size bytes): its length, or 0 */
size_t ratepool_jwt_sign(const ratepool_jwt_t *jwt, unsigned char *out,
    size_t size);


#endif /* _RATEPOOL_JWT_H_INCLUDED_ */
