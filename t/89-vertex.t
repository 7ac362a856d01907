#!/usr/bin/perl

# Claude from Google Vertex AI in the same pool: a provider=vertex key is
# a service account's JSON key; the gateway signs an RS256 assertion with
# it, trades it at the token endpoint (over TLS, its certificate checked)
# for an access token, one worker for all, again well before it expires,
# and sends requests to rawPredict / streamRawPredict with the model in
# the path and Vertex's anthropic_version in the body.  The mock checks
# the assertion's signature against the account's public key and every
# request's token.  Tokens that live 8 s are refreshed under load without
# a failed request; a key whose assertion is refused is out of rotation,
# logged, and never hangs a request; a 429 on Anthropic and on Bedrock is
# served by Vertex.

use strict;
use warnings;

use lib 't/lib';

use Encode ();
use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;
use Ratepool::Tls;

my $t = Ratepool::Test->new;
my $tls = Ratepool::Tls->new($t, mock => 0);     # the token endpoint's TLS
my $dir = $t->testdir;

my $rand = \&Ratepool::Test::random_hex;
my $ANTHROPIC = 'sk-ant-mock-a1-' . $rand->(8);
my $BEDROCK_KEY = 'ABSK' . $rand->(24);
my $EMAIL = 'gateway@proj-1.iam.gserviceaccount.com';
my $CLIENT = 'gw-vertex-' . $rand->(8);
my $VERTEX_ID = 'claude-sonnet-4-6@20260101';

# the service account's key, and one the mock does not know
for my $name (qw(sa other)) {
    system("openssl genrsa -out $dir/$name.pem 2048 2>/dev/null") == 0
        or die "openssl genrsa failed\n";
}
system("openssl rsa -in $dir/sa.pem -pubout -out $dir/sa.pub 2>/dev/null")
    == 0 or die "openssl rsa failed\n";

for my $name (qw(sa other)) {
    $t->write_file("$name.json", JSON::PP->new->canonical->pretty->encode({
        type => 'service_account', project_id => 'proj-1',
        private_key_id => "kid-$name",
        private_key => $t->read_file("$name.pem"),
        client_email => $EMAIL, client_id => '1234567890',
        token_uri => 'https://oauth2.googleapis.com/token',
    }));
}

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $ANTHROPIC   => { org => 'anthropic-1', name => 'a1' },
        $BEDROCK_KEY => { org => 'aws-east', name => 'east' },
        $EMAIL       => { org => 'gcp-east', name => 'v1' },
    },
    google => { $EMAIL => { public_key_file => "$dir/sa.pub" } },
    token_ttl => 8,
});

my $vertex = "region=us-east5 project=proj-1 server=127.0.0.1:%%PORT_1%%"
           . " token_url=https://localhost:%%PORT_2%%/token"
           . " token_ca=%%TESTDIR%%/ca.crt";

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    ratepool_model claude-sonnet-4-6 vertex=$VERTEX_ID
                   bedrock=us.anthropic.claude-sonnet-4-6-v1:0;

    upstream google {
        ratepool zone=llm;
        ratepool_key v1 provider=vertex org=gcp-east $vertex
                     service_account_file=%%TESTDIR%%/sa.json;
    }

    upstream overtls {
        ratepool zone=llm;
        ratepool_key v4 provider=vertex org=gcp-tls region=us-east5
                     project=proj-1 server=localhost:%%PORT_2%%
                     token_url=https://localhost:%%PORT_2%%/token
                     token_ca=%%TESTDIR%%/ca.crt
                     service_account_file=%%TESTDIR%%/sa.json;
    }

    upstream refused {
        ratepool zone=llm;
        ratepool_key v2 provider=vertex org=gcp-other $vertex
                     service_account_file=%%TESTDIR%%/other.json;
    }

    upstream mixed {
        ratepool zone=llm;
        ratepool_key a1 org=anthropic-1 server=127.0.0.1:%%PORT_1%%
                     key=$ANTHROPIC;
        ratepool_key east provider=bedrock region=us-east-1 org=aws-east
                     server=127.0.0.1:%%PORT_1%% key=$BEDROCK_KEY
                     fallback=1;
        ratepool_key v3 provider=vertex org=gcp-mixed $vertex
                     service_account_file=%%TESTDIR%%/sa.json fallback=2;
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($CLIENT)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://google;
        }

        location /tls/ {
            rewrite ^/tls(/.*)\$ \$1 break;
            ratepool_pass https://overtls
                          ssl_trusted_certificate=%%TESTDIR%%/ca.crt;
        }

        location /refused/ {
            rewrite ^/refused(/.*)\$ \$1 break;
            ratepool_pass http://refused;
        }

        location /mixed/ {
            rewrite ^/mixed(/.*)\$ \$1 break;
            ratepool_pass http://mixed;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

    # Google's token endpoint, over TLS
    server {
        listen 127.0.0.1:%%PORT_2%% ssl;
        ssl_certificate %%TESTDIR%%/good.crt;
        ssl_certificate_key %%TESTDIR%%/good.key;

        location / {
            proxy_pass http://127.0.0.1:%%PORT_1%%;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Seen-TLS "[\$ssl_protocol]";
            proxy_set_header X-Seen-SNI "[\$ssl_server_name]";
            proxy_buffering off;
        }
    }
}
EOF

$t->run;

my $USAGE = '{"input_tokens":120,"output_tokens":30}';

sub ask {
    my ($path, %opt) = @_;
    return $t->messages(token => $CLIENT, path => $path,
                        headers => [ 'x-mock-usage' => $USAGE,
                                     @{ $opt{headers} || [] } ],
                        body => { model => 'claude-sonnet-4-6',
                                  %{ $opt{body} || {} } });
}

sub sent_body {
    eval { decode_json(Encode::encode('UTF-8', $_[0]{body})) } || {};
}

sub tokens_issued {
    return grep { $_->{path} eq '/token' && $_->{status} == 200 }
           @{ $mock->log };
}

# the workers fetch a token as they start
my $deadline = time + 5;
sleep 0.1 while !tokens_issued() && time < $deadline;
my ($issued) = tokens_issued();
ok($issued, 'a worker fetched an access token at start');
like($issued->{headers}{'x-seen-tls'} // '', qr/^\[TLSv1\.[23]\]$/,
     'over TLS');
is($issued->{headers}{'x-seen-sni'}, '[localhost]',
   'naming the host alone in SNI');

my $r = ask('/v1/messages');
my $sent = $mock->log->[-1];
is($r->{status}, 200, 'a request through a Vertex AI key');
is($sent->{path}, '/v1/projects/proj-1/locations/us-east5/publishers/'
   . 'anthropic/models/claude-sonnet-4-6%40' . '20260101:rawPredict',
   'at rawPredict, the project, region and model in the path');
like($sent->{headers}{authorization}, qr/^Bearer ya29\.mock-/,
     'with the access token (which the mock checked)');
is_deeply([ sent_body($sent)->{anthropic_version},
            exists sent_body($sent)->{model} ],
          [ 'vertex-2023-10-16', '' ],
          'Vertex\'s anthropic_version in the body, no model');
is(decode_json($r->{body})->{usage}{output_tokens}, 30, 'answered');

$r = ask('/v1/messages', body => { stream => JSON::PP::true });
like($mock->log->[-1]{path}, qr/:streamRawPredict$/,
     'a stream goes to streamRawPredict');
like($r->{body}, qr/event: message_stop/, 'and arrives whole');

# the same over TLS, its certificate verified
$r = ask('/tls/v1/messages', body => { stream => JSON::PP::true });
is($r->{status}, 200, 'Vertex AI over TLS');
like($mock->log->[-1]{headers}{'x-seen-tls'} // '', qr/^\[TLSv1\.[23]\]$/,
     'reached over TLS');
like($r->{body}, qr/event: message_stop/, 'streamed whole');

# --- tokens that live 8 s, refreshed under load ---------------------------

my $before = scalar tokens_issued();
my $got = $t->parallel(4, sub {
    my @statuses;
    my $until = time + 10;
    while (time < $until) {
        push @statuses, ask('/v1/messages')->{status};
        sleep 0.05;
    }
    return \@statuses;
});
my @all = map { @$_ } @$got;
my $failed = grep { $_ != 200 } @all;
ok(@all > 40, scalar(@all) . ' requests over 10 s while tokens live 8 s');
is($failed, 0, 'none failed: a new token was there before the old one '
   . 'ended');
cmp_ok(scalar tokens_issued() - $before, '>=', 2,
       (scalar tokens_issued() - $before) . ' tokens fetched meanwhile');
ok(!grep({ $_->{status} == 401 } @{ $mock->log }),
   'no request was sent with an expired token');

# --- an account whose assertion is refused --------------------------------

$deadline = time + 5;
sleep 0.1 while $t->error_log !~ /key "v2" could not get an access token/
                && time < $deadline;
like($t->error_log,
     qr/ratepool: key "v2" could not get an access token from "https:\/\/localhost:\d+\/token": it refused the service account's assertion; without one it is out of rotation/,
     'an account the endpoint refuses is logged, named, out of rotation');

my $t0 = time;
$r = ask('/refused/v1/messages');
isnt($r->{status}, 200, "a pool of only that key answers at once "
     . "($r->{status})");
ok(time - $t0 < 1, 'without waiting for a token');

# --- one pool, three clouds ------------------------------------------------

for my $stream (0, 1) {
    my $how = $stream ? 'streamed' : 'not streamed';

    sleep 6 if $stream;     # the first round's cooldowns are over
    $mock->script($ANTHROPIC, [ { status => 429, retry_after => '5' } ]);
    $mock->script($BEDROCK_KEY, [ { status => 429 } ]);
    my $seen = @{ $mock->log };
    $r = ask('/mixed/v1/messages',
             body => { $stream ? (stream => JSON::PP::true) : () });
    my @tries = grep { $_->{path} ne '/token' }
                @{ $mock->log }[ $seen .. $#{ $mock->log } ];
    is($r->{status}, 200,
       "Anthropic and Bedrock throttled, $how: one clean 200");
    is(join(' ', map { ($_->{key_name} // '?') . " $_->{status}" } @tries),
       'a1 429 east 429 v1 200', 'from Vertex AI');
    is(sent_body($tries[-1])->{messages}[0]{content}, 'Hello',
       'the same request, in Vertex\'s form');
    like($r->{body}, $stream ? qr/event: message_stop/ : qr/"usage"/,
         'whole');
}

# --- nothing secret anywhere -----------------------------------------------

my $pem = $t->read_file('sa.pem');
my ($pem_line) = $pem =~ /\n([A-Za-z0-9+\/]{40,})\n/;
my $status = $t->http(port => $t->port(0), path => '/ratepool/status')->{body};
my @tokens = map { $_->{headers}{authorization} =~ /Bearer (\S+)/ ? $1 : () }
             grep { $_->{path} =~ /Predict$/ } @{ $mock->log };
ok(index($t->error_log . $status, $pem_line) < 0,
   'no private key in the log or the status');
ok(!grep({ index($t->error_log . $status, $_) >= 0 } @tokens),
   'no access token either');

$t->stop;
$t->check_log;

done_testing;
