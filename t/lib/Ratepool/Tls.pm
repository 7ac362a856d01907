package Ratepool::Tls;

# Ratepool::Tls: TLS "providers" for ratepool's tests of
# "ratepool_pass https://pool".
#
# The "provider" is a TLS front in the gateway's own nginx (a server
# block from front()) that proxies to the mock provider on the test's
# port 1 and tells it, in request headers, which SNI, Host, protocol and
# connection it saw.  Its certificates are made here with the openssl
# command line, from a throwaway CA.  Only names that resolve without
# DNS and without touching /etc/hosts are used: "localhost" (a DNS name,
# so it is sent as SNI) and "127.0.0.1" (an IP literal, which RFC 6066
# keeps out of SNI; the certificate is still checked against it).
#
#   my $t = Ratepool::Test->new;
#   my $tls = Ratepool::Tls->new($t, keys => [qw(a_name a_ip)]);
#   $t->write_config(... $tls->key_line('a_name', 'localhost:%%PORT_2%%')
#                    ... $tls->front(2, 'good') ...);
#   $tls->check_identity($tls->mock->log, 'each key as its own host');
#
# Certificates in the test directory, each NAME.crt and NAME.key:
#   ca          the CA the tests trust (ssl_trusted_certificate=)
#   rogue-ca    a CA the gateway does not trust
#   good        by ca, for localhost and 127.0.0.1
#   wrong       by ca, for wrong.example
#   localonly   by ca, for localhost only: 127.0.0.1 does not verify
#   rogue       by rogue-ca, for localhost and 127.0.0.1
#
# A key is named NAME_name when its server is localhost, NAME_ip when it
# is 127.0.0.1 (and m_good, a localhost key too): check_identity() knows
# from the name which SNI and Host it must have arrived with.

use strict;
use warnings;

use POSIX ();
use Test::More;

use Ratepool::Test;

# Skips the test without the openssl command line or nginx without TLS;
# else makes the certificates, a secret for each key of keys => [...]
# (in NAME.key.secret) and starts the mock provider on port 1, logging
# (not with mock => 0: the test starts its own).
sub new {
    my ($class, $t, %opt) = @_;

    plan skip_all => 'no openssl command line'
        unless system('openssl version >/dev/null 2>&1') == 0;
    plan skip_all => "$t->{nginx} is built without http_ssl_module"
        unless `'$t->{nginx}' -V 2>&1` =~ /--with-http_ssl_module/;

    my $self = bless { t => $t, dir => $t->testdir, serial => 1,
                       ports => {} }, $class;

    $self->make_ca('ca', 'ratepool test CA');
    $self->make_ca('rogue-ca', 'ratepool untrusted CA');

    # nginx checks a name with X509_check_host(), DNS names only: the IP
    # literal is a DNS SAN too, besides the IP SAN a browser would want
    $self->make_cert('good', 'ca', 'localhost',
                     'DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1');
    # signed by the trusted CA, but for another name
    $self->make_cert('wrong', 'ca', 'wrong.example', 'DNS:wrong.example');
    # the trusted CA, for localhost only: 127.0.0.1 does not verify
    $self->make_cert('localonly', 'ca', 'localhost', 'DNS:localhost');
    # the right names, signed by a CA the gateway does not trust
    $self->make_cert('rogue', 'rogue-ca', 'localhost',
                     'DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1');

    my @names = @{ $opt{keys} || [] };
    $self->{secret} = { map {
        $_ => 'sk-ant-mock-' . Ratepool::Test::random_hex(16) } @names };
    $t->write_file("$_.key.secret", "$self->{secret}{$_}\n") for @names;

    return $self if defined $opt{mock} && !$opt{mock};

    $self->{mock} = $t->start_mock(port => 1, log => 1, config => {
        keys => { map { $self->{secret}{$_} => { org => "org-$_",
                                                 name => $_ } } @names },
    });

    return $self;
}

sub mock { $_[0]{mock} }

# A key's secret, as the provider should see it.
sub secret { $_[0]{secret}{ $_[1] } }

# --- certificates ------------------------------------------------------------

sub openssl {
    my ($self, @args) = @_;
    my $dir = $self->{dir};
    my $pid = fork // die "fork: $!\n";

    if (!$pid) {
        chdir $dir or POSIX::_exit(126);
        open STDOUT, '>>', "$dir/openssl.log" or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        exec 'openssl', @args or POSIX::_exit(127);
    }

    waitpid $pid, 0;
    die "openssl @args failed:\n" . $self->{t}->read_file('openssl.log')
        if $?;
}

my @EC = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
          '-nodes');

sub make_ca {
    my ($self, $name, $cn) = @_;
    $self->openssl('req', '-x509', @EC, '-keyout', "$name.key",
                   '-out', "$name.crt", '-days', 2, '-subj', "/CN=$cn",
                   '-addext', 'basicConstraints=critical,CA:TRUE',
                   '-addext', 'keyUsage=critical,keyCertSign,cRLSign');
}

sub make_cert {
    my ($self, $name, $ca, $cn, $san, $usage) = @_;
    $self->{t}->write_file("$name.ext", "basicConstraints=CA:FALSE\n"
        . "keyUsage=critical,digitalSignature\n"
        . "extendedKeyUsage=" . ($usage // 'serverAuth') . "\n"
        . "subjectAltName=$san\n");
    $self->openssl('req', '-new', @EC, '-keyout', "$name.key",
                   '-out', "$name.csr", '-subj', "/CN=$cn");
    $self->openssl('x509', '-req', '-in', "$name.csr", '-CA', "$ca.crt",
                   '-CAkey', "$ca.key", '-set_serial', ++$self->{serial},
                   '-days', 2, '-extfile', "$name.ext", '-out', "$name.crt");
}

# --- configuration -----------------------------------------------------------

# "ratepool_key NAME org=org-NAME server=SERVER key_file=...;"
sub key_line {
    my ($self, $name, $server, $extra) = @_;
    return "ratepool_key $name org=org-$name server=$server "
         . "key_file=%%TESTDIR%%/$name.key.secret" . ($extra // '') . ';';
}

# The format of the fronts' access logs (front-CERT.log), for http {}.
sub log_format {
    return "log_format front "
         . "'\$ssl_server_name \"\$request\" key=\$http_x_api_key';";
}

# A TLS front on the test's port n with certificate CERT, in front of the
# mock provider.
sub front {
    my ($self, $port, $cert) = @_;
    $self->{ports}{$cert} = $port;

    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_$port%% ssl;
        ssl_certificate %%TESTDIR%%/$cert.crt;
        ssl_certificate_key %%TESTDIR%%/$cert.key;
        access_log %%TESTDIR%%/front-$cert.log front;

        location / {
            proxy_pass http://127.0.0.1:%%PORT_1%%;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Front $cert;
            proxy_set_header X-Seen-SNI "[\$ssl_server_name]";
            proxy_set_header X-Seen-Host "[\$http_host]";
            proxy_set_header X-Seen-TLS "[\$ssl_protocol]";
            proxy_set_header X-Seen-Conn "[\$connection_requests]";
            proxy_buffering off;
        }
    }
EOF
}

# --- checks ------------------------------------------------------------------

# What the TLS front saw for one request the mock logged: key, front,
# sni, host, tls, conn.
sub seen {
    my ($rec) = @_;
    my $h = $rec->{headers};
    my %s = (key => $rec->{key_name} // '?', front => $h->{'x-front'} // '');

    for my $what (qw(sni host tls conn)) {
        my ($v) = ($h->{"x-seen-$what"} // '') =~ /^\[(.*)\]$/;
        $s{$what} = $v // '(none)';
    }

    return \%s;
}

# One test: every logged request arrived through the "good" front over
# TLS 1.2 or 1.3 with the SNI and Host of the key it was sent with: keys
# named *_name (and m_good) use server=localhost, keys named *_ip
# server=127.0.0.1.
sub check_identity {
    my ($self, $log, $what) = @_;
    my $port = $self->{t}->port($self->{ports}{good} // 2);
    my %host = (localhost => "localhost:$port", ip => "127.0.0.1:$port");
    my @bad;

    for my $s (map { seen($_) } @$log) {
        my ($want_sni, $want_host) =
            $s->{key} =~ /_name$|^m_good$/ ? ('localhost', $host{localhost})
          : $s->{key} =~ /_ip$/            ? ('', $host{ip})
          :                                  ('?', '?');
        push @bad, "key $s->{key}: front=$s->{front} SNI=[$s->{sni}] "
                 . "Host=[$s->{host}] TLS=[$s->{tls}]"
            unless $s->{front} eq 'good'
                && $s->{sni} eq $want_sni && $s->{host} eq $want_host
                && $s->{tls} =~ /^TLSv1\.[23]$/;
    }

    local $Test::Builder::Level = $Test::Builder::Level + 1;
    ok(!@bad, $what) or diag join "\n", @bad;
}

# How many logged requests went out with another secret than their key's.
sub wrong_secrets {
    my ($self, $log) = @_;
    return scalar grep {
        ($_->{credential} // '') ne ($self->{secret}{ $_->{key_name} } // '')
    } @$log;
}

1;
