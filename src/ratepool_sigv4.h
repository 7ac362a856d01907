
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_SIGV4_H_INCLUDED_
#define _RATEPOOL_SIGV4_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>
#include <time.h>


/*
 * AWS Signature Version 4, as Amazon Bedrock takes it: a request's
 * method, path, query, signed headers and the SHA-256 of its exact body,
 * signed with a key derived from the secret, the day, the region and the
 * service.  The caller gives the headers to sign with lowercase names,
 * sorted, and values trimmed; nothing here allocates.
 */

#define RATEPOOL_SIGV4_DATE_LEN    16    /* 20261207T120000Z */
#define RATEPOOL_SIGV4_HEX_LEN     64


typedef struct {
    const char     *name;
    size_t          name_len;
    const char     *value;
    size_t          value_len;
} ratepool_sigv4_header_t;


typedef struct {
    const char                     *method;
    const char                     *path;       /* canonical: escaped */
    size_t                          path_len;
    const char                     *query;      /* canonical, or "" */
    size_t                          query_len;
    const ratepool_sigv4_header_t  *headers;
    size_t                          nheaders;
    const char                     *payload_hex;    /* SHA-256 of the
                                                       body, 64 digits */
    const char                     *date;       /* RATEPOOL_SIGV4_DATE_LEN */
    const char                     *region;
    size_t                          region_len;
    const char                     *service;
    const char                     *secret;
    size_t                          secret_len;
} ratepool_sigv4_t;


/* "20261207T120000Z" of a Unix time, UTC; out has room for 17 bytes */
void ratepool_sigv4_date(time_t t, char *out);

/* lowercase hex of SHA-256 of data; out has room for 65 bytes */
void ratepool_sigv4_sha256_hex(const void *data, size_t len, char *out);

/*
 * The signature, 64 hex digits and a NUL, into out.  Returns 0, or -1
 * if what is to be signed is larger than this signer's buffer.
 */
int ratepool_sigv4_sign(const ratepool_sigv4_t *s, char *out);

/*
 * The whole Authorization header value into out (size bytes): returns
 * its length, or 0 if it does not fit.
 */
size_t ratepool_sigv4_authorization(const ratepool_sigv4_t *s,
    const char *access_key, size_t access_key_len, char *out, size_t size);


#endif /* _RATEPOOL_SIGV4_H_INCLUDED_ */
