#!/usr/bin/perl

# A pool of OpenAI keys behind OpenAI's Chat Completions: the key goes as
# a bearer token, usage is read from JSON answers and from the usage chunk
# of streams (cached tokens counted as cache reads), limits are learned
# from x-ratelimit-* headers, and insufficient_quota takes a key's org out
# while rate_limit_exceeded only cools it.

use strict;
use warnings;

use lib 't/lib';

use Encode ();
use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-proj-mock-$_-" . int(rand(1e9)) } qw(k1 k2 az);
my $TOKEN = 'gw-openai-' . int(rand(1e9));

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY{k1} => { org => 'org-1', name => 'k1' },
              $KEY{k2} => { org => 'org-2', name => 'k2' },
              $KEY{az} => { org => 'org-az', name => 'az' } },
    orgs => { 'org-1' => { rpm => 100 }, 'org-2' => { rpm => 100 } } });

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream gpt {
        ratepool zone=llm;
        ratepool_key k1 org=org-1 provider=openai server=127.0.0.1:%%PORT_1%%
                     key=$KEY{k1};
        ratepool_key k2 org=org-2 provider=openai server=127.0.0.1:%%PORT_1%%
                     key=$KEY{k2};
    }

    upstream azure {
        ratepool zone=llm;
        ratepool_key az org=org-az provider=azure server=127.0.0.1:%%PORT_1%%
                     key=$KEY{az};
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://gpt;
        }

        # large bodies go to a temporary file
        location /big/ {
            rewrite ^/big(/.*)\$ \$1 break;
            client_body_buffer_size 1k;
            ratepool_pass http://gpt;
        }

        location /azure/ {
            rewrite ^/azure(/.*)\$ \$1 break;
            ratepool_pass http://azure;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

my $USAGE = '{"input_tokens":300,"cache_read_input_tokens":200,'
          . '"output_tokens":40}';

sub chat {
    my (%args) = @_;
    return $t->http(port => $t->port(0), method => 'POST',
        path => '/v1/chat/completions',
        headers => [ Authorization => "Bearer $TOKEN",
                     'x-mock-usage' => $USAGE, @{ $args{headers} || [] } ],
        body => { model => 'gpt-4o-mini', max_completion_tokens => 100,
                  messages => [ { role => 'user', content => 'Hi' } ],
                  %{ $args{body} || {} } });
}

sub team_tokens {
    my $ws = Ratepool::Test::by_name($t->status->{workspaces})->{team};
    return $ws->{tokens};
}

my $r = chat();
my $json = eval { decode_json($r->{body}) } || {};
is($r->{status}, 200, 'a chat completion through the pool');
is($json->{object}, 'chat.completion', 'answered by the provider');
is($json->{usage}{prompt_tokens}, 500, 'which counted 500 prompt tokens, '
    . '200 of them cached');

my $log = $mock->log;
like($log->[-1]{headers}{authorization}, qr/^Bearer sk-proj-mock-k\d-/,
    'the key went as a bearer token');
ok(!grep({ defined $_->{headers}{'x-api-key'} } @$log), 'and no x-api-key');

is_deeply(team_tokens(), { input => 300, cache_read => 200, output => 40,
                           cache_creation => 0 },
    'the workspace is charged 300 input tokens and 200 cache reads');

$r = chat(body => { stream => JSON::PP::true,
                    stream_options => { include_usage => JSON::PP::true } });
is($r->{status}, 200, 'a stream that asks for usage');
like($r->{body}, qr/"choices":\[\],.*"usage":\{.*"prompt_tokens":500/s,
    'gets its usage chunk');
like($r->{body}, qr/data: \[DONE\]\n\n\z/, 'and ends with [DONE]');
is(team_tokens()->{output}, 80, 'and its usage is counted too');

# a stream that does not ask for usage is counted all the same: the
# gateway asks for it, and keeps the extra chunk from the client
$r = chat(body => { stream => JSON::PP::true });
is($r->{status}, 200, 'a stream that does not ask for usage');
my @events = grep { length } split /\n\n/, $r->{body};
ok(@events >= 3, 'gets its chunks (' . scalar(@events) . ' events)');
ok(!grep({ /"choices":\[\]/ } @events), 'and no usage chunk');
is($events[-1], 'data: [DONE]', 'and [DONE]');
like($mock->log->[-1]{body}, qr/"stream_options":\{"include_usage":true\}/,
    'the provider was asked for usage');
is(team_tokens()->{output}, 120, 'which is counted');

# a body that arrives in two parts (two buffers in memory) is asked for
# usage too
my $seen = @{ $mock->log };
$r = $t->http(port => $t->port(0), method => 'POST',
    path => '/v1/chat/completions', split_at => 20, pause => 0.2,
    headers => [ Authorization => "Bearer $TOKEN", 'x-mock-usage' => $USAGE ],
    body => { model => 'gpt-4o-mini', max_completion_tokens => 100,
              stream => JSON::PP::true,
              messages => [ { role => 'user', content => 'slowly' } ] });
is($r->{status}, 200, 'a stream whose body came in two parts');
my $j = eval { decode_json($mock->log->[-1]{body}) } || {};
ok($j->{stream_options}{include_usage}
   && $j->{messages}[0]{content} eq 'slowly',
   'was asked for usage, its body whole') or diag $mock->log->[-1]{body};
is(team_tokens()->{output}, 160, 'and counted');

# a body too large for memory is asked for usage too, and stays whole
# when a 429 sends it again with the other key

$mock->script($KEY{k1}, [ { status => 429, retry_after => '1' } ],
              sticky => 1);
my $long = 'a long prompt ' . ('x' x 5000);
$seen = @{ $mock->log };
for (1 .. 2) {
    $r = $t->http(port => $t->port(0), method => 'POST',
        path => '/big/v1/chat/completions',
        headers => [ Authorization => "Bearer $TOKEN",
                     'x-mock-usage' => $USAGE ],
        body => { model => 'gpt-4o-mini', max_completion_tokens => 100,
                  stream => JSON::PP::true,
                  messages => [ { role => 'user', content => $long } ] });
    is($r->{status}, 200, "a large stream ($_) is answered");
    ok(!grep({ /"choices":\[\]/ } split /\n\n/, $r->{body}),
        'without the usage chunk it did not ask for');
}
my @sent = @{ $mock->log }[ $seen .. $#{ $mock->log } ];
ok(scalar(grep { $_->{status} == 429 } @sent) >= 1,
    'at least one was sent again after a 429');
is(scalar(grep {
        my $j = eval { decode_json(Encode::encode('UTF-8', $_->{body})) };
        $j && $j->{stream_options}{include_usage}
           && $j->{messages}[0]{content} eq $long
           && $_->{body} !~ /stream_options.*stream_options/
    } @sent), scalar @sent,
    'every try asked for usage once, with the prompt whole');
is(team_tokens()->{output}, 240, 'and both were counted');

# no cooldown left from this
$mock->reset;
$t->stop;
$t->run;

# a client that asks for no usage (false, null, or options without it)
# would be charged nothing: the gateway asks all the same, changing only
# that, and the client gets the stream it asked for
my $output = team_tokens()->{output};
for my $case (
    [ '"stream_options":{"include_usage":false}',
      qr/"stream_options":\{"include_usage":true\}/, 'include_usage false' ],
    [ '"stream_options" : { "include_usage" : null }',
      qr/"stream_options" : \{ "include_usage" : true \}/,
      'include_usage null' ],
    [ '"stream_options":null',
      qr/"stream_options":\{"include_usage":true\}/, 'stream_options null' ],
    [ '"stream_options":{}',
      qr/"stream_options":\{"include_usage":true\}/,
      'stream_options empty' ],
    [ '"stream_options":{"include_obfuscation":false}',
      qr/"stream_options":\{"include_usage":true,"include_obfuscation":false\}/,
      'stream_options with another option' ],
) {
    my ($options, $sent, $name) = @$case;
    my $body = '{"model":"gpt-4o-mini","max_completion_tokens":100,'
             . '"stream":true,' . $options . ','
             . '"messages":[{"role":"user","content":"Hi"}]}';
    $r = $t->http(port => $t->port(0), method => 'POST',
        path => '/v1/chat/completions',
        headers => [ Authorization => "Bearer $TOKEN",
                     'x-mock-usage' => $USAGE,
                     'Content-Type' => 'application/json' ],
        body => $body);
    is($r->{status}, 200, "a stream with $name is answered");
    my $got = $mock->log->[-1]{body};
    like($got, $sent, '  the provider was asked for usage')
        or diag $got;
    ok(eval { decode_json($got); 1 }, '  in a body that is still JSON');
    ok(!grep({ /"choices":\[\]/ } split /\n\n/, $r->{body}),
        '  the client gets no usage chunk');
    is(team_tokens()->{output}, $output += 40, '  and the stream is counted');
}

# Azure OpenAI: its clients send their token as api-key, and so does the
# gateway send the key
$r = $t->http(port => $t->port(0), method => 'POST',
    path => '/azure/v1/chat/completions',
    headers => [ 'api-key' => $TOKEN ],
    body => { model => 'gpt-4o-mini',
              messages => [ { role => 'user', content => 'Hi' } ] });
is($r->{status}, 200, 'an Azure client, with its token as api-key');
my $sent = $mock->log->[-1]{headers};
is($sent->{'api-key'}, $KEY{az}, 'reaches the provider with the Azure key '
    . 'as api-key');
ok(!defined $sent->{authorization} && !defined $sent->{'x-api-key'},
    'and no other credential');

# retry-after-ms says it to the millisecond
$mock->script($KEY{k1}, [ { status => 429, retry_after => '1',
                            headers => { 'retry-after-ms' => '4500' } } ]);
$mock->script($KEY{k2}, [ { status => 429, retry_after => '1',
                            headers => { 'retry-after-ms' => '4500' } } ]);
$r = chat();
my $keys = Ratepool::Test::by_name($t->status->{pools}[0]{keys});
ok($keys->{k1}{cooldown_ms} > 3500 && $keys->{k1}{cooldown_ms} < 6000,
    "retry-after-ms wins over retry-after ($keys->{k1}{cooldown_ms} ms)");
$mock->reset;

my $orgs = Ratepool::Test::by_name($t->status->{pools}[0]{orgs});
my $learned = $orgs->{'org-1'}{learned}{requests}{limit}
           || $orgs->{'org-2'}{learned}{requests}{limit};
is($learned, 100, 'the request limit is learned from x-ratelimit-*');

# rate_limit_exceeded cools; insufficient_quota takes the org out
# (a fresh gateway: no cooldown left from above)
$t->stop;
$t->run;

$mock->script($KEY{k1}, [ { status => 429, retry_after => '20', body => {
    error => { message => 'Rate limit reached for requests',
               type => 'requests', param => undef,
               code => 'rate_limit_exceeded' } } } ]);
$mock->script($KEY{k2}, [ { status => 429, retry_after => '20', body => {
    error => { message => 'Rate limit reached for requests',
               type => 'requests', param => undef,
               code => 'rate_limit_exceeded' } } } ]);
$r = chat();
is($r->{status}, 429, 'both keys at their rate limit: a 429');

my %state = map { $_->{name} => $_->{state} }
            @{ $t->status->{pools}[0]{keys} };
is_deeply(\%state, { k1 => 'cooling', k2 => 'cooling' },
    'rate_limit_exceeded only cools the keys');

$t->stop;
$t->run;
$mock->reset;

$mock->script($KEY{k1}, [ { status => 429, body => {
    error => { message => 'You exceeded your current quota',
               type => 'insufficient_quota', param => undef,
               code => 'insufficient_quota' } } } ], sticky => 1);
$mock->script($KEY{k2}, [ { status => 429, body => {
    error => { message => 'You exceeded your current quota',
               type => 'insufficient_quota', param => undef,
               code => 'insufficient_quota' } } } ], sticky => 1);

$r = chat();
$json = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'both keys out of quota');
is($json->{error}{code}, 'insufficient_quota',
    'the last answer goes out as the provider sent it');

%state = map { $_->{name} => $_->{state} } @{ $t->status->{pools}[0]{keys} };
is_deeply(\%state, { k1 => 'spent', k2 => 'spent' },
    'insufficient_quota takes both orgs out');

$r = chat();
$json = eval { decode_json($r->{body}) } || {};
is($json->{error}{code}, 'insufficient_quota',
    'then the gateway says so itself, in OpenAI\'s words');
is(scalar @{ $mock->log }, 2, 'without asking the provider again');

done_testing;
