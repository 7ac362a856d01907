
/*
 * Copyright (C) ratepool authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_ratepool_tls.h"


/*
 * The TLS client side of the gateway's own connections (the token
 * fetcher's, Redis's), on nginx's OpenSSL and event loop: the
 * handshake, then the peer's certificate checked for the name asked.
 */


#if (NGX_HTTP_SSL)

/*
 * Starts TLS on a connected c; handler runs once the handshake is over,
 * whether it worked or not (c->ssl->handshaked says).  NGX_ERROR: it
 * could not start.  name is NUL-terminated; sni: it is a host name, to
 * be sent (an address never is, RFC 6066).
 */

ngx_int_t
ngx_http_ratepool_tls_connect(ngx_connection_t *c, ngx_ssl_t *ssl,
    ngx_str_t *name, ngx_uint_t sni, ngx_connection_handler_pt handler)
{
    if (ngx_ssl_create_connection(ssl, c, NGX_SSL_CLIENT) != NGX_OK) {
        return NGX_ERROR;
    }

    if (sni
        && SSL_set_tlsext_host_name(c->ssl->connection, (char *) name->data)
           != 1)
    {
        ERR_clear_error();
    }

    if (ngx_ssl_handshake(c) == NGX_AGAIN) {
        c->ssl->handler = handler;
        return NGX_OK;
    }

    handler(c);

    return NGX_OK;
}


/* NULL if the peer's certificate verifies and is for name, else why not */

const char *
ngx_http_ratepool_tls_verify(ngx_connection_t *c, ngx_str_t *name,
    ngx_uint_t sni)
{
    int    rc;
    long   verified;
    X509  *cert;

    verified = SSL_get_verify_result(c->ssl->connection);

    if (verified != X509_V_OK) {
        return X509_verify_cert_error_string(verified);
    }

    if (sni) {
        return ngx_ssl_check_host(c, name) == NGX_OK
               ? NULL : "it is not for that name";
    }

    /* an address: the certificate's IP names */

    cert = SSL_get_peer_certificate(c->ssl->connection);
    if (cert == NULL) {
        return "there is none";
    }

    rc = X509_check_ip_asc(cert, (char *) name->data, 0);
    X509_free(cert);

    return rc == 1 ? NULL : "it is not for that address";
}

#endif
